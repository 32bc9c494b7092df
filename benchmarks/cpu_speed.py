"""CPU inference speed of Gemma 2: gemma2 (bf16, int8, int4) against transformers, on one machine.

    gemma2 bench [--layers N] [--programs gemma2,transformers,llama.cpp] [--quantize int8,int4]
                 [--repeats 3] [--decode-tokens 128] [--skip prefill2048,ctx4096] [--json FILE]
    python benchmarks/cpu_speed.py ...            (the same)

A random checkpoint of the preset's shape (default gemma-2-2b; `--layers N` shortens it,
`--config FILE` takes any config.json) is written once as bf16 safetensors in the Hugging Face
layout, or `--checkpoint DIR` reuses one. Every program then runs in a fresh subprocess, so memory
figures do not mix, with the page cache warmed by reading the files first:

- gemma2: `Gemma2ForCausalLM.from_pretrained(dtype=bfloat16)`.
- transformers: `transformers.Gemma2ForCausalLM.from_pretrained(dtype=bfloat16,
  attn_implementation="eager")` (n/a when transformers is not installed).
- gemma2 int8 / int4: `gemma2 quantize --mode int8|int4` writes a quantized copy once (its time is
  the "quantize + save" row), which `from_pretrained` then loads as it is.
- llama.cpp bf16 / Q8_0 / Q4_0: only when llama-cpp-python and gguf are importable; the same
  weights written as GGUF (see `bench_gguf.prepare_llama_cpp`). Prefill and batch-1 decode only.

Measured in each program (every timing is the median of `--repeats` runs; token ids are random in
[3, vocab) from a fixed seed, the same for every program; the lengths below are the defaults of
--prompt, --long-prompt, --context and --batch; --skip takes the keys prefill512, prefill2048,
decode, batch8, ctx4096, which keep their names in the JSON whatever the lengths):

- load s: `from_pretrained`; the library is imported before the clock starts.
- first forward s: one 8-token forward pass right after loading; memory-mapped weights are read
  from the (warm) page cache here, so a lazy load shows up in this row.
- peak RSS GB: VmHWM from /proc/self/status after that forward pass, which touches every weight
  (memory-mapped weights count once they are read). "whole run" is VmHWM at the end. The
  program's read bandwidth is measured before loading, so its test tensor is not counted.
- prefill N tok/s: N tokens / one forward pass `model(ids, logits_to_keep=1)`, batch 1.
- decode b1 tok/s: greedy decode of `--decode-tokens` tokens after a 512-token prompt; only the
  decode steps are timed: from the first new token (prefill done) to the last, (n - 1) steps, cut
  into --repeats consecutive runs whose median rate is reported (one prefill, not one per repeat).
  gemma2 is timed through `gemma2.generation.generate_steps` (what `generate` runs), transformers
  through a streamer handed to `generate(..., min_new_tokens=n)`; stopping on eos is disabled, so
  every run decodes exactly n tokens.
- decode b8 tok/s: the same with 8 rows of 512-token prompts, all new tokens per second
  (min(32, --decode-tokens) new tokens per row).
- decode @4096 ctx tok/s: batch 1 after a 4096-token prompt, min(32, --decode-tokens) new tokens.
  Two untimed short generations (batch 1 and batch 8) come first, so first-call setup is not timed.

The machine: read bandwidth (median of sums over a 1 GiB float32 tensor on huge pages, the memory
gemma2 loads weights into: see gemma2.io.weight_memory) and bf16 matmul throughput
(2048 x 2048 x 2048 `F.linear`). Decode of one token reads every weight once, so
`decode_bytes_per_token(model)` / bandwidth bounds batch-1 decode (weights only: the KV cache and
activations are not counted). The bandwidth of a shared machine drifts within seconds, so each
batch-1 decode run is set against a bandwidth probe (0.25 GiB, median of 3 sums) taken between two
tokens right before it, its time left out of the run; the report gives the median of those shares,
batch-8 / batch-1, the slowdown at 4096 tokens of context, and the targets of the speed issue
(met / NOT met). The 4096-context decode runs are paired with probes the same way; for gemma2 the
slowdown is also measured with the steps of a 512- and a 4096-token decode alternating in one
process, which the drift between two separate runs does not move, and that figure is the target's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_gguf import prepare_llama_cpp
from bench_report import bound_rows, bound_table, main_table, targets, targets_table
from bench_runners import ProgramUnavailable, quantize_checkpoint, run_program
from bench_setup import (
    GEMMA2,
    LLAMA_CPP,
    MEASUREMENTS,
    QUANT_SCHEMES,
    SHORT_DECODE,
    TRANSFORMERS,
    Settings,
    bench_config,
    checkpoint_weight_bytes,
    measure_machine,
    write_random_checkpoint,
)

if TYPE_CHECKING:
    from gemma2.config import Gemma2Config

# ----------------------------------------------------------------------------------------------
# Command line


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip() and part.strip() != "none"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shape = parser.add_argument_group("shape and checkpoint")
    shape.add_argument("--preset", default="gemma-2-2b", help="official shape to benchmark (default: gemma-2-2b)")
    shape.add_argument("--config", type=Path, help="a config.json for any other shape (instead of --preset)")
    shape.add_argument("--layers", type=int, help="shorten the model to N layers for a quick run")
    shape.add_argument("--dir", type=Path, help="write the checkpoint into DIR and keep it (default: a temp dir)")
    shape.add_argument("--checkpoint", type=Path, help="reuse a checkpoint directory instead of writing one")
    work = parser.add_argument_group("what to run")
    work.add_argument(
        "--programs", default="gemma2,transformers,llama.cpp", help="subset of gemma2,transformers,llama.cpp"
    )
    work.add_argument("--quantize", default="int8,int4", help="gemma2 quantized programs to add: int8,int4 or none")
    work.add_argument("--skip", default="", help=f"measurements to skip, of {','.join(MEASUREMENTS)}")
    work.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is shown")
    work.add_argument("--decode-tokens", type=int, default=128, help="new tokens of the batch-1 decode")
    work.add_argument("--prompt", type=int, default=512, help="prompt tokens of prefill and decode (512)")
    work.add_argument("--long-prompt", type=int, default=2048, help="tokens of the long prefill (2048)")
    work.add_argument("--context", type=int, default=4096, help="prompt tokens of the long-context decode (4096)")
    work.add_argument("--batch", type=int, default=8, help="rows of the batched decode (8)")
    work.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the bandwidth test tensor (1 GiB)")
    work.add_argument("--json", type=Path, help="also write every number to this JSON file")


def _check(args: argparse.Namespace, config: Gemma2Config) -> list[str]:
    errors = []
    unknown = set(_names(args.skip)) - set(MEASUREMENTS)
    if unknown:
        errors.append(f"--skip: unknown {sorted(unknown)}; choose from {','.join(MEASUREMENTS)}")
    unknown = set(_names(args.programs)) - {GEMMA2, TRANSFORMERS, LLAMA_CPP}
    if unknown:
        errors.append(f"--programs: unknown {sorted(unknown)}; choose from gemma2,transformers,llama.cpp")
    unknown = set(_names(args.quantize)) - set(QUANT_SCHEMES)
    if unknown:
        errors.append(f"--quantize: unknown {sorted(unknown)}; choose from int8,int4 or none")
    for name in ("repeats", "prompt", "long_prompt", "context", "batch"):
        if getattr(args, name) < 1:
            errors.append(f"--{name.replace('_', '-')} must be >= 1")
    if args.decode_tokens < 2:
        errors.append("--decode-tokens must be >= 2 (decode speed is timed between the first and last token)")
    longest = max(args.long_prompt, args.context + min(SHORT_DECODE, args.decode_tokens))
    longest = max(longest, args.prompt + args.decode_tokens)
    if longest > config.max_position_embeddings:
        errors.append(f"{longest} tokens do not fit max_position_embeddings ({config.max_position_embeddings})")
    return errors


def _program_list(args: argparse.Namespace) -> list[str]:
    chosen = _names(args.programs)
    programs = [p for p in (GEMMA2, TRANSFORMERS) if p in chosen]
    if GEMMA2 in chosen:
        programs += [f"{GEMMA2} {scheme}" for scheme in QUANT_SCHEMES if scheme in _names(args.quantize)]
    return programs


def run(args: argparse.Namespace) -> int:
    import torch

    from gemma2 import Gemma2Config

    checkpoint_given = args.checkpoint is not None
    if checkpoint_given:
        config = Gemma2Config.from_pretrained(args.checkpoint)
    else:
        config = bench_config(args.preset, args.config, args.layers)
    errors = _check(args, config)
    if args.dir is not None and args.dir.exists() and any(args.dir.iterdir()):
        errors.append(f"--dir {args.dir} is not empty (pass it as --checkpoint to reuse it)")
    if errors:
        for error in errors:
            print(f"gemma2 bench: {error}", file=sys.stderr)
        return 2

    settings = Settings(
        repeats=args.repeats,
        decode_tokens=args.decode_tokens,
        prompt=args.prompt,
        long_prompt=args.long_prompt,
        context=args.context,
        batch=args.batch,
        skip=tuple(_names(args.skip)),
        threads=torch.get_num_threads(),
        bandwidth_gib=args.bandwidth_gib,
    )
    with tempfile.TemporaryDirectory(prefix="gemma2-bench-") as scratch:
        if checkpoint_given:
            checkpoint = args.checkpoint
        else:
            checkpoint = args.dir if args.dir is not None else Path(scratch) / "checkpoint"
            start = time.perf_counter()
            write_random_checkpoint(checkpoint, config)
            print(f"wrote a random checkpoint to {checkpoint} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        weight_bytes = checkpoint_weight_bytes(checkpoint)

        machine = measure_machine(args.bandwidth_gib)
        print(
            f"CPU {machine['cpu']} ({machine['cpu_features']})\n"
            f"torch {machine['torch']}, {machine['threads']} threads\n"
            f"gemma2 kernels: {machine['kernels']} (GEMMA2_CPU_KERNELS), prompts in {machine['prompt_products']}\n"
            f"read bandwidth {machine['bandwidth_gbs']:.1f} GB/s (sum over {args.bandwidth_gib:g} GiB float32), "
            f"bf16 matmul {machine['matmul_bf16_gflops']:.0f} GFLOP/s (2048^3 F.linear)\n"
            f"shape: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}; "
            f"{weight_bytes / 1e9:.2f} GB of bf16 weights; median of {settings.repeats} run(s)"
        )

        common = {"vocab_size": config.vocab_size, "threads": settings.threads, "settings": asdict(settings)}
        results: dict[str, dict[str, Any]] = {}
        for program in _program_list(args):
            path, quantize_s = checkpoint, None
            if program.startswith(f"{GEMMA2} "):
                path = Path(scratch) / program.split()[1]
                try:
                    quantize_s = quantize_checkpoint(checkpoint, program.split()[1], path)
                except ProgramUnavailable as error:
                    print(f"{program}: {error}", file=sys.stderr)
                    results[program] = {"status": "failed", "reason": str(error)}
                    continue
            spec = {**common, "program": program, "path": str(path)}
            results[program] = run_program(spec, [path])
            if quantize_s is not None:
                results[program]["quantize_s"] = quantize_s
        if LLAMA_CPP in _names(args.programs):
            files = prepare_llama_cpp(checkpoint, Path(scratch) / "gguf", settings.threads)
            n_ctx = settings.prompt + settings.decode_tokens + 16
            for program, file in files.items():
                spec = {**common, "program": program, "path": str(file), "n_ctx": n_ctx}
                results[program] = run_program(spec, [file])

    rows = bound_rows(results, machine["bandwidth_gbs"])
    goals = targets(results, rows, weight_bytes, settings)
    print()
    print(main_table(results, settings))
    print()
    print(bound_table(rows, machine["bandwidth_gbs"], settings))
    print()
    print(targets_table(goals))
    if args.json:
        report = {
            "machine": machine,
            "shape": {**config.to_dict(), "weight_bytes": weight_bytes},
            "settings": asdict(settings),
            "programs": results,
            "bandwidth_bound": rows,
            "targets": [asdict(t) for t in goals],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gemma2 bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
