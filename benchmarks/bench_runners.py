"""The programs the CPU speed benchmark times, each loaded and measured in a fresh process.

A `Runner` per library (gemma2, transformers, llama.cpp) gives a prefill forward pass and a
generation loop that stamps each new token; `measure_program` runs in the child process
(`child_main`), `run_program` starts it and reads its one result line. `decode_bytes_per_token` is
what one decode step of a model reads.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_setup import (
    GEMMA2,
    LLAMA_CPP,
    MEASUREMENTS,
    RESULT_MARK,
    TOKEN_SEED,
    TRANSFORMERS,
    BandwidthProbe,
    Settings,
    median_seconds,
    read_bandwidth_gbs,
    warm_page_cache,
)

if TYPE_CHECKING:
    import torch

# ----------------------------------------------------------------------------------------------
# Bytes one decode step reads


def decode_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer, each tensor once.

    A tied embedding / LM-head matrix counts once (the head reads it fully for every token). The
    embedding lookup reads one row per token only, so when the LM head is a tensor of its own (an
    untied or quantized head) the input embedding table is not counted at all.
    """
    from torch import nn

    head = getattr(model, "lm_head", None)
    head_keys = {_tensor_key(t) for t in _module_tensors(head)} if isinstance(head, nn.Module) else set()
    # gemma2 and transformers both call it embed_tokens (an nn.Embedding or a quantized module).
    embedding = next((m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "embed_tokens"), None)
    lookup_only: set[tuple[int, int]] = set()
    if embedding is not None:
        embedding_keys = {_tensor_key(t) for t in _module_tensors(embedding)}
        if not embedding_keys & head_keys:
            lookup_only = embedding_keys
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in _module_tensors(model):
        key = _tensor_key(tensor)
        if key in seen or key in lookup_only:
            continue
        seen.add(key)
        total += tensor.nbytes
    return total


def _module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _tensor_key(tensor: torch.Tensor) -> tuple[int, int]:
    """Two names for the same memory (tied weights) give the same key."""
    try:
        return (tensor.data_ptr(), tensor.nbytes)
    except RuntimeError:  # tensor subclasses without storage
        return (id(tensor), tensor.nbytes)


# ----------------------------------------------------------------------------------------------
# Child side: one program, loaded and timed in a fresh process


class ProgramUnavailable(Exception):
    """The program's library is not installed (its column shows n/a)."""


class Runner:
    """A loaded program: a prefill forward pass and a generation loop that stamps each new token."""

    supported: tuple[str, ...] = MEASUREMENTS
    model: Any = None

    @property
    def bytes_per_token(self) -> int | None:
        return decode_bytes_per_token(self.model) if self.model is not None else None

    def prefill(self, ids: torch.Tensor) -> None:
        raise NotImplementedError

    def generation_stamps(
        self, ids: torch.Tensor, new_tokens: int, after_token: Callable[[int], None] = lambda i: None
    ) -> list[float]:
        """perf_counter() at each new token, exactly new_tokens of them; after_token(i) runs right
        after stamp i is taken (the bench's bandwidth probes; their time is subtracted)."""
        raise NotImplementedError

    def context_slowdown(self, short: torch.Tensor, long: torch.Tensor, new_tokens: int) -> float | None:
        """1 - (tokens/s after `long`) / (tokens/s after `short`), the decode steps of the two
        alternating in one process (median step times); None where a program cannot interleave."""
        return None

    def touch(self) -> None:
        """A short forward pass that reads every weight."""
        import torch

        self.prefill(torch.full((1, 8), 3, dtype=torch.long))


class Gemma2Runner(Runner):
    def __init__(self, model: Any) -> None:
        self.model = model.eval()

    def prefill(self, ids: torch.Tensor) -> None:
        self.model(ids, logits_to_keep=1)

    def _greedy_steps(self, ids: torch.Tensor, new_tokens: int) -> Iterator[torch.Tensor]:
        from gemma2.generation import generate_steps

        # eos_token_id=[]: no stop tokens, so exactly new_tokens steps.
        return generate_steps(self.model, ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])

    def generation_stamps(
        self, ids: torch.Tensor, new_tokens: int, after_token: Callable[[int], None] = lambda i: None
    ) -> list[float]:
        stamps: list[float] = []
        for _ in self._greedy_steps(ids, new_tokens):
            stamps.append(time.perf_counter())
            after_token(len(stamps) - 1)
        return stamps

    def context_slowdown(self, short: torch.Tensor, long: torch.Tensor, new_tokens: int) -> float:
        decodes = [self._greedy_steps(ids, new_tokens) for ids in (short, long)]
        seconds: list[list[float]] = [[], []]
        for decode in decodes:
            next(decode)  # the prompt
        for step in range(new_tokens - 1):
            for which in (0, 1) if step % 2 else (1, 0):  # alternate which goes first
                start = time.perf_counter()
                next(decodes[which])
                seconds[which].append(time.perf_counter() - start)
        return 1 - statistics.median(seconds[0]) / statistics.median(seconds[1])


class TransformersRunner(Runner):
    def __init__(self, model: Any) -> None:
        self.model = model.eval()

    def prefill(self, ids: torch.Tensor) -> None:
        self.model(ids, logits_to_keep=1)

    def generation_stamps(
        self, ids: torch.Tensor, new_tokens: int, after_token: Callable[[int], None] = lambda i: None
    ) -> list[float]:
        import torch

        stamps: list[float] = []

        class Stamps:  # the streamer protocol: put() gets the prompt, then each new token
            def put(self, value: Any) -> None:
                stamps.append(time.perf_counter())
                if len(stamps) > 1:
                    after_token(len(stamps) - 2)

            def end(self) -> None:
                pass

        self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=Stamps(),
        )
        return stamps[1:]


class LlamaCppRunner(Runner):
    supported = ("prefill512", "decode")

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def prefill(self, ids: torch.Tensor) -> None:
        self.llm.reset()
        self.llm.eval(ids[0].tolist())

    def generation_stamps(
        self, ids: torch.Tensor, new_tokens: int, after_token: Callable[[int], None] = lambda i: None
    ) -> list[float]:
        self.llm.reset()
        stamps: list[float] = []
        for _ in self.llm.generate(ids[0].tolist(), temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == new_tokens:
                break
            after_token(len(stamps) - 1)
        return stamps


def program_loader(spec: dict[str, Any]) -> Callable[[], Runner]:
    """Import the program's library now (not timed); the returned call loads the checkpoint (timed)."""
    import torch

    program, path = spec["program"], spec["path"]
    if program == TRANSFORMERS:
        try:
            import transformers
        except ImportError as error:
            raise ProgramUnavailable(f"transformers is not installed ({error})") from None
        transformers.logging.set_verbosity_error()
        return lambda: TransformersRunner(
            transformers.Gemma2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager")
        )
    if program.startswith(LLAMA_CPP):
        try:
            import llama_cpp
        except ImportError as error:
            raise ProgramUnavailable(f"llama-cpp-python is not installed ({error})") from None
        threads, n_ctx = spec["threads"], spec["n_ctx"]
        return lambda: LlamaCppRunner(
            llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        )
    from gemma2 import Gemma2ForCausalLM

    # Quantized programs load the checkpoint `gemma2 quantize` wrote (see quantize_checkpoint).
    return lambda: Gemma2Runner(Gemma2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16))


def quantize_checkpoint(checkpoint: Path, scheme: str, out: Path) -> float:
    """Write `gemma2 quantize --mode scheme` of the checkpoint to out (a fresh process); seconds taken."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "gemma2", "quantize", "--model", str(checkpoint), "--mode", scheme, "--out"]
    done = subprocess.run([*command, str(out)], capture_output=True, text=True, check=False, env=_child_env())
    if done.returncode != 0:
        raise ProgramUnavailable(f"gemma2 quantize failed: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def random_ids(batch: int, length: int, vocab: int) -> torch.Tensor:
    import torch

    generator = torch.Generator().manual_seed(TOKEN_SEED)
    return torch.randint(3, vocab, (batch, length), generator=generator)


def prefill_rate(runner: Runner, ids: torch.Tensor, repeats: int) -> float:
    return ids.numel() / median_seconds(lambda: runner.prefill(ids), repeats)


def decode_rate(runner: Runner, ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """New tokens per second over the decode steps only (first new token to last).

    One generation (a prompt is not prefilled again for each repeat); its decode steps are cut into
    `repeats` consecutive runs of equal length, and the median run's rate is reported.
    """
    return statistics.median(rate for rate, _ in decode_runs(runner, ids, new_tokens, repeats))


def decode_runs(
    runner: Runner, ids: torch.Tensor, new_tokens: int, repeats: int, probe: BandwidthProbe | None = None
) -> list[tuple[float, float | None]]:
    """(tokens/s, read bandwidth GB/s right before it) of each run of decode_rate.

    With a probe, the bandwidth is measured at the start of each run, between two tokens, and the
    time it takes is left out of the run: the machine's bandwidth drifts within seconds, so each
    run is set against its own.
    """
    steps = new_tokens - 1
    runs = max(1, min(repeats, steps))
    bounds = [round(i * steps / runs) for i in range(runs + 1)]
    probed: dict[int, tuple[float, float]] = {}  # token index -> (GB/s, seconds the probe took)

    def measure(index: int) -> None:
        if probe is not None and index in bounds[:-1] and index not in probed:
            start = time.perf_counter()
            bandwidth = probe.measure()
            probed[index] = (bandwidth, time.perf_counter() - start)

    stamps = runner.generation_stamps(ids, new_tokens, measure)
    if len(stamps) != new_tokens:
        raise RuntimeError(f"asked for {new_tokens} new tokens, got {len(stamps)}")
    results = []
    for lo, hi in itertools.pairwise(bounds):
        bandwidth, spent = probed.get(lo, (None, 0.0))
        results.append((ids.shape[0] * (hi - lo) / (stamps[hi] - stamps[lo] - spent), bandwidth))
    return results


def paired_decode(
    runner: Runner, ids: torch.Tensor, new_tokens: int, repeats: int, result: dict[str, Any], key: str
) -> float:
    """Batch-1 decode rate (as decode_rate); also stores each run's rate and bandwidth in result[key_runs]."""
    runs = decode_runs(runner, ids, new_tokens, repeats, BandwidthProbe())
    result[f"{key}_runs"] = [{"tok_s": rate, "bandwidth_gbs": bandwidth} for rate, bandwidth in runs]
    return statistics.median(rate for rate, _ in runs)


def vm_hwm_gb() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
    with open("/proc/self/status", encoding="utf-8") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM")) * 1024 / 1e9


def warm_up(runner: Runner, settings: Settings, vocab: int) -> None:
    """Two untimed short generations (batch 1 and the batch size): first calls set things up."""
    if settings.wants("decode") or settings.wants("ctx4096"):
        runner.generation_stamps(random_ids(1, 8, vocab), 2)
    if settings.wants("batch8") and "batch8" in runner.supported:
        runner.generation_stamps(random_ids(settings.batch, 8, vocab), 2)


def measure_program(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    settings = Settings(**{**spec["settings"], "skip": tuple(spec["settings"]["skip"])})
    torch.set_num_threads(settings.threads)
    load = program_loader(spec)
    # Measured here, next to the decode timings: the machine's bandwidth drifts between programs.
    # Before loading, so that the test tensor does not add to the peak memory after loading.
    bandwidth = read_bandwidth_gbs(settings.bandwidth_gib)
    start = time.perf_counter()
    runner = load()
    result: dict[str, Any] = {"status": "ok", "load_s": time.perf_counter() - start, "bandwidth_gbs": bandwidth}
    result["decode_bytes_per_token"] = runner.bytes_per_token
    vocab, repeats, n = spec["vocab_size"], settings.repeats, settings.decode_tokens
    with torch.inference_mode():
        start = time.perf_counter()
        runner.touch()
        result["first_forward_s"] = time.perf_counter() - start
        result["peak_rss_gb"] = vm_hwm_gb()
        warm_up(runner, settings, vocab)
        plan: dict[str, Callable[[], float]] = {
            "prefill512": lambda: prefill_rate(runner, random_ids(1, settings.prompt, vocab), repeats),
            "prefill2048": lambda: prefill_rate(runner, random_ids(1, settings.long_prompt, vocab), repeats),
            "decode": lambda: paired_decode(
                runner, random_ids(1, settings.prompt, vocab), n, repeats, result, "decode"
            ),
            "batch8": lambda: decode_rate(
                runner, random_ids(settings.batch, settings.prompt, vocab), settings.short_decode, repeats
            ),
            "ctx4096": lambda: paired_decode(
                runner, random_ids(1, settings.context, vocab), settings.short_decode, repeats, result, "ctx4096"
            ),
        }
        for key, measure in plan.items():
            if settings.wants(key) and key in runner.supported:
                result[key] = measure()
        # The target's program only: it prefills both prompts once more (about 2 minutes for 2B).
        if settings.wants("ctx4096") and spec["program"] == GEMMA2:
            result["ctx4096_interleaved_slowdown"] = runner.context_slowdown(
                random_ids(1, settings.prompt, vocab), random_ids(1, settings.context, vocab), settings.short_decode
            )
    result["peak_rss_run_gb"] = vm_hwm_gb()
    return result


def child_main(spec_text: str) -> int:
    """Entry point of the child process: print one result line (JSON after RESULT_MARK)."""
    spec = json.loads(spec_text)
    try:
        result = measure_program(spec)
    except ProgramUnavailable as error:
        result = {"status": "n/a", "reason": str(error)}
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


CHILD = "import sys; from bench_runners import child_main; sys.exit(child_main(sys.argv[1]))"


def _child_env() -> dict[str, str]:
    import gemma2

    env = dict(os.environ)
    # So the child imports this gemma2 and these benchmark modules.
    package_root = str(Path(gemma2.__file__).resolve().parents[1])
    benchmarks = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, benchmarks, env.get("PYTHONPATH")) if p)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def run_program(spec: dict[str, Any], warm: Sequence[Path]) -> dict[str, Any]:
    """Run one program in a fresh interpreter; failures are reported, never raised."""
    warm_page_cache(warm)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=False, env=_child_env()
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if out.returncode != 0 or not lines:
        print(f"{spec['program']}: failed (exit code {out.returncode})\n{out.stderr[-3000:]}", file=sys.stderr)
        return {"status": "failed", "reason": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""}
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_MARK) :])
    note = result.get("reason", f"{time.perf_counter() - start:.0f} s")
    print(f"{spec['program']}: {result['status']} ({note})", file=sys.stderr)
    return result
