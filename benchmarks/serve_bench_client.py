"""The serving benchmark's client and metrics, as vLLM's serving benchmark defines them (vllm/benchmarks/serve.py).

- TTFT: from sending a request to its first non-empty content chunk.
- ITL: the gaps between successive content chunks of one request.
- TPOT: (E2EL - TTFT) / (output tokens - 1), per request.
- E2EL: from sending to the end of the response, on the client.
- output tok/s: all output tokens / the wall time of the run at that concurrency.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class RequestResult:
    sent: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each non-empty content chunk
    done: float = 0.0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def e2el(self) -> float:
        return self.done - self.sent

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(results: list[RequestResult], duration: float) -> dict[str, float]:
    """Throughputs, and the median and p99 of TTFT, TPOT, ITL and E2EL, in milliseconds."""
    ok = [r for r in results if r.error is None and r.chunk_times]
    summary: dict[str, float] = {
        "requests": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": sum(r.output_tokens for r in ok) / duration,
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [gap for r in ok for gap in r.itls],
        "e2el": [r.e2el for r in ok],
    }
    for name, values in series.items():
        summary[f"{name}_p50_ms"] = percentile(values, 50) * 1000
        summary[f"{name}_p99_ms"] = percentile(values, 99) * 1000
        summary[f"{name}_mean_ms"] = (statistics.fmean(values) if values else float("nan")) * 1000
    return summary


def completion_body(prompt: list[int], output_len: int, model: str | None) -> dict[str, Any]:
    """Greedy, exactly output_len tokens on any server: ignore_eos where known, eos ids biased away elsewhere."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "logit_bias": {"1": -100, "107": -100},
    }
    if model:
        body["model"] = model
    return body


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    result = RequestResult(sent=time.perf_counter())
    chunks = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = usage["completion_tokens"]
                if any(choice.get("text") for choice in chunk.get("choices", [])):
                    result.chunk_times.append(time.perf_counter())
                    chunks += 1
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
    result.done = time.perf_counter()
    if not result.output_tokens:  # a server without usage in streams: one token per chunk
        result.output_tokens = chunks
    return result


async def run_load(
    url: str, prompts: list[list[int]], output_len: int, concurrency: int, model: str | None
) -> tuple[list[RequestResult], float]:
    """Every prompt sent at once (rate inf), at most `concurrency` in flight; (results, wall seconds)."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:

        async def limited(prompt: list[int]) -> RequestResult:
            async with gate:
                return await one_request(client, url, completion_body(prompt, output_len, model))

        started = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        return list(results), time.perf_counter() - started
