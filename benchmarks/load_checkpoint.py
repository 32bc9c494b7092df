"""Load time and peak memory of a Gemma 2 checkpoint: gemma2 against transformers, side by side.

    python benchmarks/load_checkpoint.py [--preset gemma-2-2b] [--layers N] [--dtype bf16]

Writes a random checkpoint of the preset's shape once (bf16 safetensors, 5 GB shards, the
Hugging Face layout), then, each in a fresh process so memory figures do not mix, loads it with
gemma2 and with transformers (eager attention, same dtype) and runs one short forward pass.
Reports load seconds, resident memory after loading and peak resident memory after the forward
pass (which touches every weight), and checks that both programs give the same logits.
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
import json, sys, time, torch
program, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
def rss_gb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e9
start = time.perf_counter()
if program == "gemma2":
    from gemma2 import Gemma2ForCausalLM
    model = Gemma2ForCausalLM.from_pretrained(path, dtype=dtype)
elif program == "gemma2-random-init":
    from gemma2 import Gemma2Config, Gemma2ForCausalLM
    model = Gemma2ForCausalLM(Gemma2Config.from_pretrained(path)).to(dtype)
else:
    import transformers
    transformers.logging.set_verbosity_error()
    model = transformers.Gemma2ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
seconds = time.perf_counter() - start
after_load = rss_gb()
ids = torch.tensor([[2, 651, 6037, 576, 6081, 603]])
with torch.no_grad():
    logits = model(ids).logits[0, -1].float()
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1e6
print(json.dumps({"seconds": seconds, "rss_after_load_gb": after_load, "peak_rss_gb": peak,
                  "top": logits.topk(5).indices.tolist(), "logits": logits[:64].tolist()}))
"""


def write_random_checkpoint(directory: Path, preset: str, layers: int | None) -> int:
    """Random bf16 weights of the preset's shape (see bench_setup); returns their bytes."""
    from bench_setup import bench_config
    from bench_setup import write_random_checkpoint as write

    return write(directory, bench_config(preset, None, layers))


def run_child(program: str, path: Path, dtype: str) -> dict:
    # Read every file once first, so each program finds the same warm page cache.
    for file in path.iterdir():
        with open(file, "rb") as handle:
            while handle.read(1 << 26):
                pass
    out = subprocess.run(
        [sys.executable, "-c", CHILD, program, str(path), dtype], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{program} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gemma-2-2b")
    parser.add_argument("--layers", type=int, help="shorten the model to N layers for a quick run")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--dir", type=Path, help="where to write the checkpoint (default: a temporary directory)")
    parser.add_argument("--no-transformers", action="store_true", help="time gemma2 only")
    parser.add_argument("--random-init", action="store_true", help="also time building the model with random init")
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        path = Path(scratch) / "checkpoint"
        start = time.perf_counter()
        weight_bytes = write_random_checkpoint(path, args.preset, args.layers)
        print(f"wrote {weight_bytes / 1e9:.2f} GB of bf16 weights in {time.perf_counter() - start:.1f} s")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load dtype {args.dtype}")
        programs = ["gemma2"] + ([] if args.no_transformers else ["transformers"])
        programs += ["gemma2-random-init"] if args.random_init else []
        results = {program: run_child(program, path, args.dtype) for program in programs}

    print(f"\n{'program':<20} {'load s':>8} {'RSS after load GB':>18} {'peak RSS GB':>12} {'peak / weights':>15}")
    for program, r in results.items():
        print(
            f"{program:<20} {r['seconds']:>8.2f} {r['rss_after_load_gb']:>18.2f} {r['peak_rss_gb']:>12.2f} "
            f"{r['peak_rss_gb'] * 1e9 / weight_bytes:>15.2f}"
        )
    if "transformers" in results:
        ours, theirs = results["gemma2"], results["transformers"]
        diff = max(abs(a - b) for a, b in zip(ours["logits"], theirs["logits"]))
        print(f"\nload time ratio transformers / gemma2: {theirs['seconds'] / ours['seconds']:.1f}x")
        print(f"same top-5 next tokens: {ours['top'] == theirs['top']}; max |logit diff| (first 64): {diff:.4f}")


if __name__ == "__main__":
    main()
