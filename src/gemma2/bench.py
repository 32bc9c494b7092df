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
  weights written as GGUF (see `prepare_llama_cpp`). Prefill and batch-1 decode only.

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
gemma2 loads weights into: see gemma2.weight_memory) and bf16 matmul throughput
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
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from gemma2.config import Gemma2Config

GEMMA2 = "gemma2"
TRANSFORMERS = "transformers"
LLAMA_CPP = "llama.cpp"
QUANT_SCHEMES = ("int8", "int4")
LLAMA_CPP_TYPES = ("bf16", "Q8_0", "Q4_0")
# Measurement keys (named after the default lengths; the table shows the lengths actually used).
MEASUREMENTS = ("prefill512", "prefill2048", "decode", "batch8", "ctx4096")
TOKEN_SEED = 1234
SHORT_DECODE = 32  # new tokens of the batch and long-context decodes (at most --decode-tokens)
RESULT_MARK = "GEMMA2_BENCH_RESULT "


# ----------------------------------------------------------------------------------------------
# Settings and the checkpoint


@dataclass(frozen=True)
class Settings:
    """What each program measures; sent to the child processes as JSON."""

    repeats: int = 3
    decode_tokens: int = 128
    prompt: int = 512
    long_prompt: int = 2048
    context: int = 4096
    batch: int = 8
    skip: tuple[str, ...] = ()
    threads: int = 1
    bandwidth_gib: float = 1.0

    @property
    def short_decode(self) -> int:
        return min(SHORT_DECODE, self.decode_tokens)

    def wants(self, key: str) -> bool:
        return key not in self.skip

    def labels(self) -> dict[str, str]:
        return {
            "quantize_s": "quantize + save s",
            "load_s": "load s",
            "first_forward_s": "first forward s",
            "peak_rss_gb": "peak RSS GB",
            "peak_rss_run_gb": "peak RSS, whole run GB",
            "prefill512": f"prefill {self.prompt} tok/s",
            "prefill2048": f"prefill {self.long_prompt} tok/s",
            "decode": "decode b1 tok/s",
            "batch8": f"decode b{self.batch} tok/s",
            "ctx4096": f"decode @{self.context} ctx tok/s",
            "bandwidth_gbs": "read bandwidth GB/s",
        }


def bench_config(preset: str, config_file: Path | None, layers: int | None) -> Gemma2Config:
    """The shape to benchmark: a preset or a config.json, optionally with fewer layers."""
    from gemma2 import Gemma2Config

    config = Gemma2Config.from_json_file(config_file) if config_file else Gemma2Config.from_preset(preset)
    if layers:
        config = config.replace(num_hidden_layers=layers)
    return config.replace(architectures=["Gemma2ForCausalLM"], dtype="bfloat16")


def write_random_checkpoint(directory: Path, config: Gemma2Config) -> int:
    """Random bf16 weights of the config's shape as safetensors (5 GB shards) plus config.json.

    Returns the bytes of the weights. Linear and embedding weights have std 0.02, norms 0.1.
    """
    import torch

    from gemma2 import Gemma2ForCausalLM
    from gemma2.checkpoint import parse_size, write_safetensors

    with torch.device("meta"):
        skeleton = Gemma2ForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, meta in skeleton.checkpoint_state_dict().items():
        std = 0.02 if meta.dim() == 2 else 0.1
        tensors[name] = (torch.randn(meta.shape, generator=generator, dtype=torch.float32) * std).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory, tensors, parse_size("5GB"))
    (directory / "config.json").write_text(config.to_json_string())
    return sum(t.numel() * t.element_size() for t in tensors.values())


def checkpoint_weight_bytes(directory: Path) -> int:
    """Bytes of all tensors in a directory's safetensors files, read from their headers."""
    from gemma2.checkpoint import safetensors_header

    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        _, entries = safetensors_header(file)
        total += sum(end - start for start, end in (entry["data_offsets"] for entry in entries.values()))
    return total


def warm_page_cache(paths: Iterable[Path]) -> None:
    """Read every file once, so each program finds the same warm page cache."""
    for path in paths:
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        for file in files:
            with open(file, "rb") as handle:
                while handle.read(1 << 26):
                    pass


# ----------------------------------------------------------------------------------------------
# The machine


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of summing a float32 tensor of `gib` GiB (one warm-up, then the median).

    The tensor lives in the kind of memory gemma2 loads weights into (huge pages where the OS
    offers them, see weight_memory): reads from it are the fastest the weights can be read.
    """
    return BandwidthProbe(gib, repeats).measure()


class BandwidthProbe:
    """read_bandwidth_gbs with the tensor allocated once, for probes between decode tokens."""

    def __init__(self, gib: float = 0.25, repeats: int = 3) -> None:
        import torch

        from gemma2.weight_memory import empty_bytes

        self.tensor = empty_bytes(int(gib * 2**30) // 4 * 4).view(torch.float32).fill_(1.0)
        self.repeats = repeats

    def measure(self) -> float:
        self.tensor.sum()
        return self.tensor.nbytes / median_seconds(self.tensor.sum, self.repeats) / 1e9


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n by n x n bf16 F.linear (one warm-up, then the median)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(torch.bfloat16)
    w = torch.randn(n, n, generator=generator).to(torch.bfloat16)
    F.linear(a, w)
    seconds = median_seconds(lambda: F.linear(a, w), repeats)
    return 2 * n**3 / seconds / 1e9


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def measure_machine(bandwidth_gib: float) -> dict[str, Any]:
    import torch

    return {
        "cpu": cpu_model_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bandwidth_gbs": read_bandwidth_gbs(bandwidth_gib),
        "bandwidth_gib": bandwidth_gib,
        "matmul_bf16_gflops": matmul_gflops(),
    }


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


CHILD = "import sys; from gemma2.bench import child_main; sys.exit(child_main(sys.argv[1]))"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)  # so the child imports this gemma2
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
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


# ----------------------------------------------------------------------------------------------
# llama.cpp (optional): the same weights as GGUF


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp columns cannot run, or None when they can."""
    missing = []
    for module, package in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf"), ("numpy", "numpy")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    return f"{' and '.join(missing)} not installed" if missing else None


def gguf_tensor_name(key: str) -> str | None:
    """The GGUF name of a Hugging Face Gemma 2 tensor (None for the tied lm_head)."""
    if key == "model.embed_tokens.weight":
        return "token_embd.weight"
    if key == "model.norm.weight":
        return "output_norm.weight"
    if key == "lm_head.weight":
        return None
    parts = key.split(".")  # model.layers.{i}.{module...}.weight
    if parts[:2] != ["model", "layers"] or len(parts) < 5:
        raise ValueError(f"no GGUF name for {key}")
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "post_feedforward_layernorm": "post_ffw_norm",
    }
    return f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_gguf(checkpoint: Path, out: Path) -> None:
    """The checkpoint as a bf16 GGUF file of architecture "gemma2", as llama.cpp's converter writes it.

    Norm weights are stored as float32 with Gemma's +1 folded in (llama.cpp multiplies by w, not
    1 + w). The vocabulary is a placeholder of the right size (special tokens at the config's ids,
    the 256 byte tokens, then numbered pieces): the benchmark feeds token ids, never text.
    """
    import gguf
    import torch
    from safetensors import safe_open

    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    writer = gguf.GGUFWriter(str(out), "gemma2")
    writer.add_name("gemma2 bench (random weights)")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_sliding_window(config["sliding_window"])
    add_placeholder_vocab(writer, config)
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for key in tensors.keys():
                name = gguf_tensor_name(key)
                if name is None:
                    continue
                tensor = tensors.get_tensor(key)
                if tensor.dim() == 1:
                    writer.add_tensor(name, (tensor.float() + 1).numpy())
                else:
                    data = tensor.to(torch.bfloat16).view(torch.int16).numpy()
                    writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_placeholder_vocab(writer: Any, config: dict[str, Any]) -> None:
    import gguf

    size = config["vocab_size"]
    special = {
        config.get("pad_token_id", 0): "<pad>",
        _first(config.get("eos_token_id", 1)): "<eos>",
        config.get("bos_token_id", 2): "<bos>",
        3: "<unk>",
    }
    byte_ids = range(4, 4 + 256) if size >= 4 + 256 else range(0)
    tokens, types = [], []
    for i in range(size):
        if i in special:
            tokens.append(special[i])
            types.append(gguf.TokenType.UNKNOWN if special[i] == "<unk>" else gguf.TokenType.CONTROL)
        elif i in byte_ids:
            tokens.append(f"<0x{i - 4:02X}>")
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(f"\u2581piece{i}")
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(size)])
    writer.add_token_types(types)
    writer.add_bos_token_id(config.get("bos_token_id", 2))
    writer.add_eos_token_id(_first(config.get("eos_token_id", 1)))
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(config.get("pad_token_id", 0))
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)


def _first(value: int | list[int]) -> int:
    return value[0] if isinstance(value, list) else value


def llama_cpp_quantize(source: Path, out: Path, kind: str, threads: int) -> None:
    """Q8_0 / Q4_0 with llama.cpp's own quantizer (its usual choice for the output tensor)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params.nthread = threads
    with native_output_silenced():
        done = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if done != 0:
        raise RuntimeError(f"llama_model_quantize to {kind} failed")


@contextlib.contextmanager
def native_output_silenced() -> Iterator[None]:
    """Send what C code prints (llama.cpp logs every tensor it quantizes) to /dev/null meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def prepare_llama_cpp(checkpoint: Path, work: Path, threads: int) -> dict[str, Path]:
    """GGUF files for the llama.cpp columns: {"llama.cpp bf16": path, ...}; {} when unavailable.

    Never raises: a missing package or a failed step is printed as one line and skipped.
    """
    missing = llama_cpp_missing()
    if missing:
        print(f"llama.cpp columns skipped: {missing} (pip install llama-cpp-python gguf)")
        return {}
    files: dict[str, Path] = {}
    try:
        work.mkdir(parents=True, exist_ok=True)
        bf16 = work / "model-bf16.gguf"
        write_gguf(checkpoint, bf16)
        files[f"{LLAMA_CPP} bf16"] = bf16
        for kind in LLAMA_CPP_TYPES[1:]:
            out = work / f"model-{kind}.gguf"
            llama_cpp_quantize(bf16, out, kind, threads)
            files[f"{LLAMA_CPP} {kind}"] = out
    except Exception as error:  # optional part: report and go on with what was written
        print(f"llama.cpp: stopped preparing GGUF files: {type(error).__name__}: {error}")
    return files


# ----------------------------------------------------------------------------------------------
# Report


def fmt(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if digits is not None:
        return f"{value:.{digits}f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def cell(result: dict[str, Any], key: str, settings: Settings) -> str:
    status = result.get("status")
    if status != "ok":
        return "n/a" if status == "n/a" else "failed"
    if key in MEASUREMENTS and not settings.wants(key):
        return "skip"
    return fmt(result.get(key))


def value(results: dict[str, dict[str, Any]], program: str, key: str) -> float | None:
    result = results.get(program, {})
    number = result.get(key) if result.get("status") == "ok" else None
    return float(number) if isinstance(number, (int, float)) and number > 0 else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def main_table(results: dict[str, dict[str, Any]], settings: Settings) -> str:
    labels = settings.labels()
    programs = list(results)
    show_ratio = GEMMA2 in results and TRANSFORMERS in results
    width = max(14, *(len(p) + 2 for p in programs))
    header = f"{'':<26}" + "".join(f"{p:>{width}}" for p in programs)
    header += f"{'gemma2 / transformers':>23}" if show_ratio else ""
    lines = [header]
    for key, label in labels.items():
        row = f"{label:<26}" + "".join(f"{cell(results[p], key, settings):>{width}}" for p in programs)
        if show_ratio:
            row += f"{fmt(ratio(value(results, GEMMA2, key), value(results, TRANSFORMERS, key)), 2):>23}"
        lines.append(row)
    return "\n".join(lines)


def bound_rows(results: dict[str, dict[str, Any]], bandwidth_gbs: float) -> list[dict[str, Any]]:
    """Per program: bytes per decoded token, the bandwidth bound, the share of it, b8/b1, slowdown."""
    rows = []
    for program in results:
        per_token = value(results, program, "decode_bytes_per_token")
        if per_token is None:
            continue
        decode = value(results, program, "decode")
        runs = [r for r in results[program].get("decode_runs", []) if r["bandwidth_gbs"]]
        if runs:
            # Each decode run against the bandwidth measured right before it (the median of both).
            bandwidth = statistics.median(r["bandwidth_gbs"] for r in runs)
            share = statistics.median(r["tok_s"] * per_token / (r["bandwidth_gbs"] * 1e9) for r in runs)
        else:
            bandwidth = value(results, program, "bandwidth_gbs") or bandwidth_gbs
            share = ratio(decode, bandwidth * 1e9 / per_token)
        bound = bandwidth * 1e9 / per_token
        long_context = value(results, program, "ctx4096")
        rows.append(
            {
                "program": program,
                "bandwidth_gbs": bandwidth,
                "bytes_per_token": int(per_token),
                "bound_tok_s": bound,
                "decode_tok_s": decode,
                "share_of_bound": share,
                "batch_over_single": ratio(value(results, program, "batch8"), decode),
                "long_context_slowdown": 1 - long_context / decode if long_context and decode else None,
                "long_context_slowdown_interleaved": value(results, program, "ctx4096_interleaved_slowdown"),
            }
        )
    return rows


def bound_table(rows: list[dict[str, Any]], bandwidth_gbs: float, settings: Settings) -> str:
    lines = [
        "decode against the bandwidth bound (bytes read per token, weights only, / read bandwidth measured right"
        " before each decode run, between two tokens; GB/s and share are the medians over the runs;"
        f" {bandwidth_gbs:.1f} GB/s at the start)",
        f"{'program':<16}{'GB/s':>6}{'MB/token':>10}{'bound tok/s':>13}{'decode b1':>11}{'share':>8}"
        f"{f'b{settings.batch} / b1':>9}{f'@{settings.context} slowdown':>17}{'interleaved':>13}",
    ]
    for r in rows:
        share = r["share_of_bound"]
        slowdown, interleaved = r["long_context_slowdown"], r["long_context_slowdown_interleaved"]
        lines.append(
            f"{r['program']:<16}{r['bandwidth_gbs']:>6.1f}{fmt(r['bytes_per_token'] / 1e6):>10}"
            f"{fmt(r['bound_tok_s']):>13}"
            f"{fmt(r['decode_tok_s']):>11}{'-' if share is None else f'{share:.0%}':>8}"
            f"{fmt(r['batch_over_single'], 2):>9}{'-' if slowdown is None else f'{slowdown:.1%}':>17}"
            f"{'-' if interleaved is None else f'{interleaved:.1%}':>13}"
        )
    lines.append(
        f"interleaved: the @{settings.context} slowdown with the two decodes' steps alternating in one process"
        " (the separate runs above are minutes apart, while the bandwidth drifts; gemma2 bf16 only)"
    )
    return "\n".join(lines)


@dataclass
class Target:
    name: str
    goal: str
    value: float | None
    shown: str
    met: bool | None  # None: not measured


def targets(
    results: dict[str, dict[str, Any]], rows: list[dict[str, Any]], weight_bytes: int, settings: Settings
) -> list[Target]:
    def v(program: str, key: str) -> float | None:
        return value(results, program, key)

    bf16 = next((r for r in rows if r["program"] == GEMMA2), {})
    decode = v(GEMMA2, "decode")
    # Drift-free where the program can interleave the two decodes (see bound_table).
    slowdown = bf16.get("long_context_slowdown_interleaved")
    if slowdown is None:
        slowdown = bf16.get("long_context_slowdown")
    rss = v(GEMMA2, "peak_rss_gb")
    checks: list[tuple[str, str, float | None, Callable[[float], bool], Callable[[float], str]]] = [
        ("bf16 decode / bandwidth bound", ">= 90%", bf16.get("share_of_bound"), lambda x: x >= 0.9, _pct),
        ("bf16 decode / transformers", ">= 1.6x", ratio(decode, v(TRANSFORMERS, "decode")), lambda x: x >= 1.6, _x),
        (
            f"prefill {settings.prompt} / transformers",
            ">= 2x",
            ratio(v(GEMMA2, "prefill512"), v(TRANSFORMERS, "prefill512")),
            lambda x: x >= 2,
            _x,
        ),
        ("int8 decode / bf16 decode", ">= 1.8x", ratio(v(f"{GEMMA2} int8", "decode"), decode), lambda x: x >= 1.8, _x),
        ("int4 decode / bf16 decode", ">= 3x", ratio(v(f"{GEMMA2} int4", "decode"), decode), lambda x: x >= 3, _x),
        (f"batch-{settings.batch} / batch-1 decode", ">= 5x", bf16.get("batch_over_single"), lambda x: x >= 5, _x),
        (
            f"decode @{settings.context} slowdown vs @{settings.prompt} (interleaved)",
            "<= 15%",
            slowdown,
            lambda x: x <= 0.15,
            _pct,
        ),
        (
            # Weights are memory-mapped and read on first use: count the first forward pass too.
            "load + first forward (bf16)",
            "< 10 s",
            sum(x for x in (v(GEMMA2, "load_s"), v(GEMMA2, "first_forward_s")) if x is not None) or None,
            lambda x: x < 10,
            lambda x: f"{x:.2f} s",
        ),
        (
            "peak RSS / weight bytes (bf16)",
            "<= 1.1x",
            rss * 1e9 / weight_bytes if rss and weight_bytes else None,
            lambda x: x <= 1.1,
            _x,
        ),
    ]
    return [
        Target(name, goal, x, "-" if x is None else show(x), None if x is None else passes(x))
        for name, goal, x, passes, show in checks
    ]


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _x(x: float) -> str:
    return f"{x:.2f}x"


def targets_table(items: list[Target]) -> str:
    lines = [f"{'target (gemma2)':<40}{'value':>10}{'goal':>10}  status"]
    for t in items:
        status = "n/a" if t.met is None else ("met" if t.met else "NOT met")
        lines.append(f"{t.name:<40}{t.shown:>10}{t.goal:>10}  {status}")
    return "\n".join(lines)


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
            f"CPU {machine['cpu']}; torch {machine['torch']}, {machine['threads']} threads\n"
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
