"""The server's Prometheus metrics (`GET /metrics`), named after vLLM's so dashboards carry over.

Each server has its own registry, so several servers in one process (tests) never share counts.
Gauges are set by the engine thread after every step; counters and histograms as things happen.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a few milliseconds (a decode step of a tiny model) to minutes (a long prompt on a CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)


class ServerMetrics:
    def __init__(self, model_name: str, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def gauge(name: str, doc: str) -> Gauge:
            return _labelled(Gauge(name, doc, ["model_name"], registry=self.registry), labels)

        def counter(name: str, doc: str) -> Counter:
            return _labelled(Counter(name, doc, ["model_name"], registry=self.registry), labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return _labelled(Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry), labels)

        self.running = gauge("gemma2:num_requests_running", "Requests holding KV rows (prefilling or decoding).")
        self.waiting = gauge("gemma2:num_requests_waiting", "Requests queued for a KV row.")
        self.rows_in_use = gauge("gemma2:kv_rows_in_use", "KV cache rows in use (one per choice).")
        self.rows_total = gauge("gemma2:kv_rows_total", "KV cache rows (--max-batch).")
        self.rows_total.set(max_batch)
        self.prompt_tokens = counter("gemma2:prompt_tokens", "Prompt tokens read.")
        self.generation_tokens = counter("gemma2:generation_tokens", "Tokens generated.")
        self._success = Counter(
            "gemma2:request_success",
            "Requests finished, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._rejected = Counter(
            "gemma2:requests_rejected",
            "Requests refused before queueing, by cause.",
            ["model_name", "reason"],
            registry=self.registry,
        )
        self.aborted = counter("gemma2:requests_aborted", "Requests ended early (client gone or shutdown).")
        self.time_to_first_token = histogram(
            "gemma2:time_to_first_token_seconds", "From arrival to the first token.", LATENCY_BUCKETS
        )
        self.inter_token_latency = histogram(
            "gemma2:inter_token_latency_seconds", "Between two tokens of one choice.", STEP_BUCKETS
        )
        self.e2e_latency = histogram("gemma2:e2e_request_latency_seconds", "From arrival to the end.", LATENCY_BUCKETS)
        self.queue_time = histogram(
            "gemma2:request_queue_time_seconds", "From arrival to taking a KV row.", LATENCY_BUCKETS
        )
        self.model_name = model_name

    def finished(self, reason: str) -> None:
        self._success.labels(model_name=self.model_name, finished_reason=reason).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(model_name=self.model_name, reason=reason).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)


def _labelled(metric: Any, labels: dict[str, str]) -> Any:
    return metric.labels(**labels)
