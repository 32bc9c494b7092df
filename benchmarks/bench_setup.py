"""What every part of the CPU speed benchmark shares: names, settings, the random checkpoint and the machine.

The constants and `Settings` (what each program measures), the random checkpoint of a Gemma 2 shape
in the Hugging Face layout, and the machine's read bandwidth and bf16 matmul throughput.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from gemma2.io.checkpoint import parse_size, write_safetensors

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
    from gemma2.io.checkpoint import safetensors_header

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

        from gemma2.io.weight_memory import empty_bytes

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

    from gemma2.backends.cpu import library, prefill

    return {
        "cpu": cpu_model_name(),
        "cpu_features": library.cpu_summary(),
        "kernels": library.variant() or "PyTorch ops",
        "prompt_products": "float32" if prefill.enabled() else "bf16",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bandwidth_gbs": read_bandwidth_gbs(bandwidth_gib),
        "bandwidth_gib": bandwidth_gib,
        "matmul_bf16_gflops": matmul_gflops(),
    }
