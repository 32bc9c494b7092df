"""benchmarks/serve_bench_client.py: the serving metrics as vLLM's serving benchmark defines them, on set timings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from serve_bench_client import RequestResult, completion_body, percentile, summarize


def test_one_requests_ttft_tpot_itl_and_e2el() -> None:
    result = RequestResult(sent=10.0, chunk_times=[10.5, 10.7, 11.0, 11.1], done=11.2, output_tokens=5)
    assert result.ttft == pytest.approx(0.5)
    assert result.e2el == pytest.approx(1.2)
    assert result.tpot == pytest.approx((1.2 - 0.5) / 4)  # (E2EL - TTFT) / (tokens - 1)
    assert result.itls == pytest.approx([0.2, 0.3, 0.1])
    assert RequestResult(sent=0.0, chunk_times=[1.0], done=1.0, output_tokens=1).tpot is None


def test_percentiles_interpolate_like_numpy() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0


def test_summaries_count_only_completed_requests() -> None:
    ok = [RequestResult(sent=0.0, chunk_times=[0.1 * (i + 1), 0.5], done=1.0, output_tokens=4) for i in range(3)]
    failed = RequestResult(sent=0.0, error="HTTP 500")
    summary = summarize([*ok, failed], duration=2.0)
    assert summary["requests"] == 3 and summary["failed"] == 1
    assert summary["output_throughput"] == pytest.approx(12 / 2.0)
    assert summary["request_throughput"] == pytest.approx(1.5)
    assert summary["ttft_p50_ms"] == pytest.approx(200.0)
    assert summary["e2el_p99_ms"] == pytest.approx(1000.0)


def test_the_request_body_fixes_the_output_length_on_any_server() -> None:
    body = completion_body([2, 10, 11], 64, None)
    assert body["max_tokens"] == 64 and body["ignore_eos"] and body["temperature"] == 0
    assert body["logit_bias"] == {"1": -100, "107": -100} and "model" not in body
