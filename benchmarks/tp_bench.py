"""Tensor parallelism on this machine's CPU: what each rank holds, what it sends, and how long it waits.

    .venv/bin/python benchmarks/tp_bench.py                 # memory table, then 2B / 9B / 27B at TP 1 and 2
    .venv/bin/python benchmarks/tp_bench.py --presets gemma-2-2b --tp 2,4

1. Memory: weights and KV cache (one sequence of the full 8192-token context, bf16) per rank, for
   the three sizes at TP 1, 2, 4, 8, from the plan (gemma2.distributed.plan) on the presets' shapes.
2. Communication, counted by the ranks' `Collectives` (not estimated): calls and bytes per decode
   token (greedy, batch 1) and per prefill token (one prompt of --prompt tokens), and the seconds
   spent inside collectives against the whole step. Random bf16 weights from a checkpoint written
   once (`--layers` keeps that many layers: the 9B and 27B at full depth do not fit two ranks in
   this machine's memory; their counts are per layer, times the preset's layer count, plus the
   embedding's and the argmax's, which do not depend on depth). Ranks are gloo processes on
   127.0.0.1 with --threads each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

PRESETS = ("gemma-2-2b", "gemma-2-9b", "gemma-2-27b")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--tp", default="1,2", help="TP sizes to run (the memory table always shows 1, 2, 4, 8)")
    parser.add_argument("--layers", type=int, default=2, help="layers of the 9B / 27B checkpoints (2B: all)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "gemma2" / "tp-bench")
    return parser.parse_args(argv)


def memory_table() -> str:
    import torch

    from gemma2 import Gemma2Config, Gemma2ForCausalLM
    from gemma2.cache import cache_memory_bytes
    from gemma2.distributed.plan import Layout, bytes_per_rank

    lines = [
        "| model | TP | weights per rank GiB | KV per rank at 8192 tokens MiB | kv heads per rank |",
        "|---" * 5 + "|",
    ]
    for preset in PRESETS:
        config = Gemma2Config.from_preset(preset)
        with torch.device("meta"):
            model = Gemma2ForCausalLM(config)
        tensors = {k: (tuple(t.shape), 2) for k, t in model.checkpoint_state_dict().items()}
        for size in (1, 2, 4, 8):
            layout = Layout.of(config, 0, size)
            kv = cache_memory_bytes(config.replace(num_key_value_heads=layout.local_kv_heads), 8192)
            heads = f"{layout.local_kv_heads}" + (
                f" (x{layout.kv_replicas} replicated)" if layout.kv_replicas > 1 else ""
            )
            weights = bytes_per_rank(tensors, layout) / 2**30
            lines.append(f"| {preset} | {size} | {weights:.2f} | {kv / 2**20:,.0f} | {heads} |")
    return "\n".join(lines)


def checkpoint(preset: str, layers: int | None, work: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_setup import bench_config, write_random_checkpoint

    directory = work / f"{preset}{f'-{layers}l' if layers else ''}"
    if not (directory / "config.json").exists():
        print(f"writing random weights to {directory}", flush=True)
        write_random_checkpoint(directory, bench_config(preset, None, layers))
    return directory


def rank_main(rank: int, world: int, directory: str, args: dict[str, Any], rendezvous: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from gemma2 import Gemma2ForCausalLM
    from gemma2.cache import Gemma2Cache

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(args["threads"])
    tp = world > 1
    if tp:
        dist.init_process_group(
            "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
        )
    model = Gemma2ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, tp_plan="auto" if tp else None)
    stats = model.tensor_parallel.collectives.stats if tp else None
    prompt = torch.randint(1000, 200000, (1, args["prompt"]), generator=torch.Generator().manual_seed(0))
    result: dict[str, Any] = {"bytes_read": model.loading_info.bytes_read}
    with torch.no_grad():
        for _ in ("warm-up", "measured"):
            cache = Gemma2Cache(model.config, max_length=args["prompt"] + args["decode"] + 1, max_batch=1)
            if stats:
                stats.reset()
            started = time.perf_counter()
            logits = model(prompt, past_key_values=cache, logits_to_keep=1).logits
            prefill = time.perf_counter() - started
            prefill_stats = _snapshot(stats)
            if stats:
                stats.reset()
            token = logits[:, -1].argmax(-1, keepdim=True)
            started = time.perf_counter()
            for _ in range(args["decode"]):
                local = model(token, past_key_values=cache, logits_to_keep=1, vocab_shard=True).logits[:, -1]
                token = model.greedy_tokens_of_shard(local)[:, None]
            decode = time.perf_counter() - started
            result.update(prefill_s=prefill, decode_s=decode, prefill=prefill_stats, decode=_snapshot(stats))
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if tp:
        dist.destroy_process_group()


def _snapshot(stats: Any) -> dict[str, dict[str, float]]:
    if stats is None:
        return {}
    return {
        kind: {"calls": stats.calls[kind], "bytes": stats.payload_bytes[kind], "seconds": stats.seconds.get(kind, 0.0)}
        for kind in stats.calls
    }


def run_world(directory: Path, world: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.multiprocessing as mp

    settings = {"threads": args.threads, "prompt": args.prompt, "decode": args.decode}
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            rank_main,
            args=(world, str(directory), settings, f"{out}/rendezvous", out),
            nprocs=world,
            start_method="spawn",
        )
        return torch.load(Path(out) / "rank0.pt", weights_only=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from gemma2 import Gemma2Config

    print("Memory per rank (bf16 weights; the tied embedding / LM head split by vocabulary):\n")
    print(memory_table(), flush=True)
    rows = [
        "| model | TP | per decode token: collectives / KiB sent | per prefill token: KiB sent | "
        "decode ms/token | in collectives | prefill ms/token | in collectives |",
        "|---" * 8 + "|",
    ]
    for preset in args.presets.split(","):
        full = Gemma2Config.from_preset(preset)
        layers = None if preset == "gemma-2-2b" else args.layers
        directory = checkpoint(preset, layers, args.work)
        for world in [int(x) for x in args.tp.split(",")]:
            got = run_world(directory, world, args)
            scale = full.num_hidden_layers / (layers or full.num_hidden_layers)
            per_decode = _per_token(got["decode"], args.decode, args.decode, scale, layers is not None)
            per_prefill = _per_token(got["prefill"], args.prompt, 1, scale, layers is not None)
            inside_d = sum(v["seconds"] for v in got["decode"].values()) / got["decode_s"] if world > 1 else 0.0
            inside_p = sum(v["seconds"] for v in got["prefill"].values()) / got["prefill_s"] if world > 1 else 0.0
            depth = "" if layers is None else f" ({layers} of {full.num_hidden_layers} layers run)"
            rows.append(
                f"| {preset}{depth} | {world} | {per_decode[0]:.0f} / {per_decode[1] / 1024:.1f} | "
                f"{per_prefill[1] / 1024:.1f} | {1000 * got['decode_s'] / args.decode:.1f} | {inside_d:.0%} | "
                f"{1000 * got['prefill_s'] / args.prompt:.1f} | {inside_p:.0%} |"
            )
            print(rows[-1], flush=True)
    print("\nCommunication (counted on rank 0; KiB are the payloads each rank hands to the collectives):\n")
    print("\n".join(rows))
    return 0


def _per_token(
    stats: dict[str, dict[str, float]], tokens: int, forwards: int, scale: float, scaled: bool
) -> tuple[float, float]:
    """(collectives, payload bytes) per token. With fewer layers run than the model has, the layers'
    all-reduces (all but the embedding's one per forward) count `scale` times; the embedding's and
    the head's collectives do not depend on depth and count as they were."""
    calls = sum(v["calls"] for v in stats.values())
    sent = sum(v["bytes"] for v in stats.values())
    if scaled and "all_reduce" in stats:
        reduces = stats["all_reduce"]
        per_call = reduces["bytes"] / reduces["calls"]  # every all-reduce of a forward has the same size
        layer_calls = reduces["calls"] - forwards
        calls += layer_calls * (scale - 1)
        sent += layer_calls * per_call * (scale - 1)
    return calls / tokens, sent / tokens


if __name__ == "__main__":
    sys.exit(main())
