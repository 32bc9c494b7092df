"""Run a function on N CPU processes joined by gloo, as torchrun's ranks would be, and collect what each returns.

    results = run_ranks(tp_workers.logits_worker, 4, payload)   # [rank 0's result, rank 1's, ...]

The ranks are spawned processes (torch.multiprocessing), rendezvous through a file in a fresh
directory (no port to race for), one thread each (four ranks on two cores are oversubscribed
already), and a collective that waits past `timeout` fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 180


def _rank_main(rank: int, world: int, target: Callable[..., Any], payload: Any, directory: str, timeout: float) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the loopback: a container's hostname may not route
    torch.set_num_threads(1)
    out = Path(directory) / f"rank{rank}.pt"
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{directory}/rendezvous",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout),
        )
        try:
            result = target(payload)
        finally:
            dist.destroy_process_group()
        torch.save({"result": result}, out)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, out)
        raise


def run_ranks(target: Callable[..., Any], world: int, payload: Any = None, timeout: float = DEFAULT_TIMEOUT_S) -> list:
    """target(payload) on each of `world` ranks; their results in rank order (a rank's error fails here)."""
    with tempfile.TemporaryDirectory() as directory:
        context = mp.start_processes(
            _rank_main,
            args=(world, target, payload, directory, timeout),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    raise AssertionError(f"the {world} ranks did not finish in {timeout:.0f} s (a hang?)")
        except mp.ProcessRaisedException:
            pass  # the rank's own traceback is in its file, read below
        except mp.ProcessExitedException as error:
            raise AssertionError(f"a rank died: {error}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        paths = [Path(directory) / f"rank{rank}.pt" for rank in range(world)]
        saved = [torch.load(path, weights_only=False) if path.exists() else None for path in paths]
        for rank, entry in enumerate(saved):
            if entry is not None and "error" in entry:
                raise AssertionError(f"rank {rank} of {world} failed:\n{entry['error']}")
        for rank, entry in enumerate(saved):
            if entry is None:
                raise AssertionError(f"rank {rank} of {world} left no result (killed or hung)")
        return [entry["result"] for entry in saved if entry is not None]
