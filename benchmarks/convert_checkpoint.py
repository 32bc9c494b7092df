"""Time and peak memory of `gemma2 convert` on an original-format checkpoint of a chosen shape.

    python benchmarks/convert_checkpoint.py [--preset gemma-2-2b] [--format pytorch|flax] [--max-shard-size 1GB]

Writes a random bf16 checkpoint in Google's original layout (PyTorch `model.ckpt`, or a Flax/Orbax
directory), then converts it in a fresh process and reports wall time and peak resident memory
(VmHWM) of that process against the checkpoint's size: streaming keeps the peak near one output
shard plus the Python/torch baseline, not the whole model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
import torch
from gemma2.convert import convert_checkpoint
baseline = hwm()
start = time.perf_counter()
summary = convert_checkpoint(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3], progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "baseline": baseline, "peak": hwm(),
                  "line": summary.line()}))
"""


def write_original(directory: Path, preset: str, fmt: str) -> int:
    import torch

    from gemma2 import Gemma2Config

    c = Gemma2Config.from_preset(preset)
    d, F, H, K, D = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    directory.mkdir(parents=True)
    if fmt == "pytorch":
        state = {"embedder.weight": rand(c.vocab_size, d), "model.norm.weight": rand(d)}
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            state[f"{p}.self_attn.qkv_proj.weight"] = rand((H + 2 * K) * D, d)
            state[f"{p}.self_attn.o_proj.weight"] = rand(d, H * D)
            state[f"{p}.mlp.gate_proj.weight"] = rand(F, d)
            state[f"{p}.mlp.up_proj.weight"] = rand(F, d)
            state[f"{p}.mlp.down_proj.weight"] = rand(d, F)
            for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
                state[f"{p}.{norm}_layernorm.weight"] = rand(d)
        torch.save({"model_state_dict": state}, directory / "model.ckpt")
        return sum(t.numel() * 2 for t in state.values())
    import ml_dtypes
    import numpy as np
    import orbax.checkpoint as ocp

    def arr(*shape: int) -> np.ndarray:
        return rand(*shape).view(torch.uint16).numpy().view(ml_dtypes.bfloat16)

    tree = {"transformer/embedder": {"input_embedding": arr(c.vocab_size + 128, d)}}
    tree["transformer/final_norm"] = {"scale": arr(d)}
    gating = (2, d, F) if preset == "gemma-2-2b" else (2, F, d)
    for i in range(c.num_hidden_layers):
        p = f"transformer/layer_{i}"
        tree[f"{p}/attn/q_einsum"] = {"w": arr(H, d, D)}
        tree[f"{p}/attn/kv_einsum"] = {"w": arr(2, K, d, D)}
        tree[f"{p}/attn/attn_vec_einsum"] = {"w": arr(H, D, d)}
        tree[f"{p}/mlp/gating_einsum"] = {"w": arr(*gating)}
        tree[f"{p}/mlp/linear"] = {"w": arr(F, d)}
        for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            tree[f"{p}/{norm}"] = {"scale": arr(d)}
    ocp.PyTreeCheckpointer().save(directory / "flax", tree)
    return sum(leaf.nbytes for node in tree.values() for leaf in node.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gemma-2-2b")
    parser.add_argument("--format", choices=["pytorch", "flax"], default="pytorch")
    parser.add_argument("--max-shard-size", default="1GB")
    parser.add_argument("--dir", type=Path, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        source = Path(scratch) / "original"
        start = time.perf_counter()
        size = write_original(source, args.preset, args.format)
        print(f"wrote a {size / 1e9:.2f} GB {args.format} checkpoint in {time.perf_counter() - start:.0f} s")
        path = source / "model.ckpt" if args.format == "pytorch" else source / "flax"
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(Path(scratch) / "converted"), args.max_shard_size],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
    print(r["line"])
    print(
        f"peak RSS {r['peak'] / 1e9:.2f} GB (baseline after imports {r['baseline'] / 1e9:.2f} GB; "
        f"checkpoint {size / 1e9:.2f} GB; shard limit {args.max_shard_size}); {r['seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
