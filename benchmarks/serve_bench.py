"""Serving benchmark: `gemma2 serve` against llama.cpp's OpenAI server on the same weights, one server at a time.

    .venv/bin/python benchmarks/serve_bench.py                       # gemma-2-2b shape, concurrency 1, 2, 4, 8
    .venv/bin/python benchmarks/serve_bench.py --layers 2 --concurrency 1,2 --num-prompts 4   # a quick look

Each server runs alone on the machine (`--threads` torch / llama.cpp threads) and gets random
prompts of `--input-len` tokens, greedy, exactly `--output-len` new tokens each (`ignore_eos`, and
eos ids biased away), after two warm-up requests. At each concurrency C, `--num-prompts` requests
(default 4 x C, at least 8) go out at once with at most C in flight; the metrics are those of
vLLM's serving benchmark (see serve_bench_client.py). llama.cpp's server is llama-cpp-python's
`python -m llama_cpp.server --interrupt_requests false` (one request at a time: the server people
pip-install), on the weights written as a BF16 GGUF; its prompts are strings of byte tokens of
the same length. At concurrency 1, gemma2's requests alternate with the library's own loop
(`gemma2.generation.generate_steps`, in this process, while the server idles) on the same prompt,
for the target that the server adds little to the time per output token: pairs taken seconds
apart see the same machine, where runs minutes apart would not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from serve_bench_client import run_load, summarize

GEMMA2, LLAMA = "gemma2", "llama.cpp"
PAIRS = 16  # gemma2's requests at concurrency 1, each paired with the library's own generation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a checkpoint directory (default: random weights of --preset)")
    parser.add_argument("--preset", default="gemma-2-2b", help="shape of the random checkpoint (default gemma-2-2b)")
    parser.add_argument("--layers", type=int, help="keep only this many layers (quick runs)")
    parser.add_argument("--servers", default=f"{GEMMA2},{LLAMA}")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--num-prompts", type=int, help="requests per concurrency (default max(8, 4 x C))")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "gemma2" / "serve-bench")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    return parser.parse_args(argv)


# ---- the weights ---------------------------------------------------------------------------


def checkpoint(args: argparse.Namespace) -> Path:
    """The model directory, with the Gemma tokenizer copied in when it has none (random weights)."""
    if args.model:
        return args.model
    from bench_setup import bench_config, write_random_checkpoint

    from gemma2.io.assets import gemma_tokenizer_model
    from gemma2.tokenizer import Gemma2Tokenizer

    directory = args.work / f"{args.preset}{f'-{args.layers}l' if args.layers else ''}"
    if not (directory / "tokenizer.json").exists():
        print(f"writing a random {args.preset} checkpoint to {directory}", flush=True)
        write_random_checkpoint(directory, bench_config(args.preset, None, args.layers))
        shutil.copyfile(gemma_tokenizer_model(), directory / "tokenizer.model")
        Gemma2Tokenizer.from_pretrained(directory).save_pretrained(directory)
    return directory


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids after <bos>, clear of the special ids (0-3) and of the vocabulary's tail."""
    rng = random.Random(seed)
    return [[2] + [rng.randrange(1000, min(vocab, 200_000)) for _ in range(length - 1)] for _ in range(count)]


# ---- the servers ---------------------------------------------------------------------------


class Server:
    """A server process on a free port, up once /health (or /v1/models) answers 200."""

    def __init__(self, command: list[str], port: int | None, health: str) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.port = port
        self.found = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if port is None and not self.found.wait(120):
            raise RuntimeError(f"no port from {command[:3]}: {self.lines[-5:]}")
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited {self.process.returncode}: {''.join(self.lines[-10:])}")
            try:
                if httpx.get(f"{self.url}{health}", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:3]} not ready in 600 s")
            time.sleep(0.2)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if found and self.port is None:
                self.port = int(found.group(1))
                self.found.set()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gemma2(directory: Path, args: argparse.Namespace) -> Server:
    gemma2 = Path(sys.executable).with_name("gemma2")
    command = [str(gemma2), "serve", "--model", str(directory), "--port", "0", "--threads", str(args.threads)]
    command += ["--max-batch", str(args.max_batch), "--dtype", "bf16", "--log-level", "warning"]
    return Server(command, None, "/health")


def start_llama(directory: Path, args: argparse.Namespace) -> Server:
    from bench_gguf import write_gguf

    gguf = directory / "model-bf16.gguf"
    if not gguf.exists():
        write_gguf(directory, gguf)
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(args.threads)]
    command += ["--n_threads_batch", str(args.threads), "--n_ctx", str(args.input_len + args.output_len + 64)]
    command += ["--interrupt_requests", "false", "--port", str(port), "--host", "127.0.0.1"]
    return Server(command, port, "/v1/models")


def as_text(prompt: list[int]) -> str:
    """A prompt of the same length for the placeholder-vocabulary GGUF: one byte token per letter (+ <bos>)."""
    rng = random.Random(sum(prompt))
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in prompt[1:])


def measure_server(
    name: str, server: Server, args: argparse.Namespace, vocab: int, generate: Generate | None = None
) -> dict[int, dict[str, float]]:
    model = None  # both servers serve one model whatever the name
    convert = as_text if name == LLAMA else (lambda p: p)
    warm = prompts(2, args.input_len, vocab, seed=99)
    asyncio.run(run_load(server.url, [convert(p) for p in warm], args.output_len, 1, model))  # type: ignore[misc]
    rows = {}
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        count = args.num_prompts or max(8, 4 * concurrency)
        batch = [convert(p) for p in prompts(count, args.input_len, vocab, seed=concurrency)]
        if concurrency == 1 and generate is not None:
            pairs = [convert(p) for p in prompts(max(count, PAIRS), args.input_len, vocab, seed=concurrency)]
            rows[1] = measure_paired(server, generate, pairs, args)  # type: ignore[arg-type]
            print(f"  {name} c=1: {rows[1]['output_throughput']:.2f} output tok/s, paired with generate", flush=True)
            continue
        results, duration = asyncio.run(run_load(server.url, batch, args.output_len, concurrency, model))  # type: ignore[arg-type]
        failed = [r.error for r in results if r.error]
        if failed:
            print(f"  {name} c={concurrency}: {len(failed)} failed, e.g. {failed[0]}")
        short = [r.output_tokens for r in results if not r.error and r.output_tokens != args.output_len]
        if short:
            print(f"  {name} c={concurrency}: {len(short)} requests gave other lengths than {args.output_len}: {short}")
        rows[concurrency] = summarize(results, duration)
        print(f"  {name} c={concurrency}: {rows[concurrency]['output_throughput']:.2f} output tok/s", flush=True)
    return rows


class Generate:
    """The library's own loop (`gemma2.generation.generate_steps`, batch 1, no server) on the bench's prompts."""

    def __init__(self, directory: Path, args: argparse.Namespace) -> None:
        import torch

        from gemma2 import Gemma2ForCausalLM

        torch.set_num_threads(args.threads)
        self.model = Gemma2ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
        self.output_len = args.output_len
        self.tpot(prompts(1, args.input_len, self.model.config.vocab_size, seed=98)[0])  # warm-up

    def tpot(self, prompt: list[int]) -> float:
        """Seconds per output token after the first, as the client measures TPOT."""
        import torch

        from gemma2.generation import generate_steps

        stamps = []
        ids = torch.tensor([prompt])
        for _ in generate_steps(self.model, ids, max_new_tokens=self.output_len, eos_token_id=[]):
            stamps.append(time.perf_counter())
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def measure_paired(server: Server, generate: Generate, batch: list[list[int]], args: argparse.Namespace) -> dict:
    """Concurrency 1 with each request right after `generate` on the same prompt, so both see the same
    moment of the machine (its bandwidth drifts by more than the 5 % the target allows)."""
    results, duration, tpots = [], 0.0, []
    for i, prompt in enumerate(batch):
        # Which of the two goes first alternates, so that a drift within a pair cancels over pairs.
        if i % 2 == 0:
            tpots.append(generate.tpot(prompt))
        one, seconds = asyncio.run(run_load(server.url, [prompt], args.output_len, 1, None))
        if i % 2 == 1:
            tpots.append(generate.tpot(prompt))
        results += one
        duration += seconds
    row = summarize(results, duration)
    row["generate_tpot_p50_ms"] = statistics.median(tpots) * 1000
    served = [r.tpot for r in results if r.tpot is not None and not r.error]
    # Each pair's ratio, then their median: the drift between pairs cancels.
    row["paired_tpot_ratio"] = statistics.median(s / g for s, g in zip(served, tpots))
    return row


# ---- the report ------------------------------------------------------------------------------


def table(rows: dict[int, dict[str, float]]) -> str:
    head = "| concurrency | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms"
    head += " | E2EL p50 / p99 ms |"
    lines = [head, "|---" * 7 + "|"]
    for c, r in rows.items():
        pairs = " | ".join(f"{r[f'{m}_p50_ms']:.0f} / {r[f'{m}_p99_ms']:.0f}" for m in ("ttft", "tpot", "itl", "e2el"))
        lines.append(f"| {c} | {r['request_throughput']:.3f} | {r['output_throughput']:.2f} | {pairs} |")
    return "\n".join(lines)


def machine() -> str:
    import torch

    from gemma2.backends.cpu import library

    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    try:
        from importlib.metadata import version

        llama = version("llama-cpp-python")
    except Exception:
        llama = "not installed"
    return f"CPU: {cpu}; features: {library.cpu_summary()}; torch {torch.__version__}; llama-cpp-python {llama}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    directory = checkpoint(args)
    config = json.loads((directory / "config.json").read_text())
    vocab = config["vocab_size"]
    results: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(results["machine"], flush=True)
    for name in args.servers.split(","):
        try:
            server = (start_gemma2 if name == GEMMA2 else start_llama)(directory, args)
        except Exception as error:
            print(f"{name}: not measured: {type(error).__name__}: {error}")
            continue
        try:
            # The library's loop runs in this process, between the server's requests at concurrency 1.
            generate = Generate(directory, args) if name == GEMMA2 else None
            results[name] = measure_server(name, server, args, vocab, generate)
            del generate
        finally:
            server.stop()
    print(f"\n{results['machine']}")
    print(
        f"{args.preset} shape{f', {args.layers} layers' if args.layers else ''}, bf16, input {args.input_len}, "
        f"output {args.output_len}, {args.threads} threads, gemma2 --max-batch {args.max_batch}\n"
    )
    for name in (GEMMA2, LLAMA):
        if name in results:
            print(f"{name}:\n\n{table(results[name])}\n")
    ours = results.get(GEMMA2)
    if ours and 1 in ours:
        if 4 in ours:
            ratio = ours[4]["output_throughput"] / ours[1]["output_throughput"]
            print(f"output tok/s at concurrency 4 / concurrency 1: {ratio:.2f}x (target >= 2.5x)")
        one = ours[1]
        print(
            f"TPOT at concurrency 1: {one['tpot_p50_ms']:.1f} ms, gemma2 generate on the same prompts, each right "
            f"before: {one['generate_tpot_p50_ms']:.1f} ms; median ratio of the pairs {one['paired_tpot_ratio']:.3f} "
            "(target within 5 %)"
        )
    if ours and LLAMA in results:
        for c in ours:
            if c in results[LLAMA]:
                x = ours[c]["output_throughput"] / results[LLAMA][c]["output_throughput"]
                print(f"output tok/s gemma2 / llama.cpp at concurrency {c}: {x:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
