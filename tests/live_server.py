"""A live `gemma2 serve` for the server tests: uvicorn on 127.0.0.1, port 0, in a thread of the test process.

The model is the bundled demo model (real tokenizer, real text) in float32, loaded once per
process; each `LiveServer` has its own engine thread, metrics and settings.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from typing import Any

import httpx
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from gemma2 import Gemma2ForCausalLM
from gemma2.engine import Engine
from gemma2.io.default_model import BUNDLED
from gemma2.server.app import ServerState, build_app
from gemma2.server.prepare import ServerSettings
from gemma2.server.worker import EngineWorker
from gemma2.tokenizer import Gemma2Tokenizer

MODEL_NAME = "gemma2-demo"


@functools.cache
def demo() -> tuple[Gemma2ForCausalLM, Gemma2Tokenizer]:
    """The bundled demo model in float32 (greedy tokens then do not depend on the batch) and its tokenizer."""
    model = Gemma2ForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32)
    return model, Gemma2Tokenizer.from_pretrained(BUNDLED)


class LiveServer:
    def __init__(
        self,
        max_batch: int = 4,
        max_queue: int = 64,
        prefill_chunk: int = 64,
        max_model_len: int | None = None,
        **settings: Any,
    ) -> None:
        model, tokenizer = demo()
        self.model, self.tokenizer = model, tokenizer
        context = model.config.max_position_embeddings
        self.settings = ServerSettings(
            model_name=MODEL_NAME,
            max_model_len=max_model_len or context,
            max_batch=max_batch,
            vocab_size=model.config.vocab_size,
            **settings,
        )
        self.state = ServerState(self.settings)
        engine = Engine(
            model,
            max_batch=max_batch,
            max_length=self.settings.max_model_len,
            prefill_chunk=prefill_chunk,
            preallocate=False,
        )
        self.worker = EngineWorker(engine, self.state.metrics, max_queue)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            build_app(self.state), log_level="warning", access_log=False, timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.worker.start()
        self.state.ready(self.tokenizer, self.worker)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start in 20 s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.worker.stop()
        self.sock.close()

    # ---- clients ----------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)

    def async_client(self, **kwargs: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs
        )

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=60, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=60, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name (labels other than model_name folded into the name)."""
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(self.get("/metrics").text):
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != "model_name"}
                suffix = "".join(f"{{{k}={v}}}" for k, v in sorted(labels.items()))
                values[sample.name + suffix] = sample.value
        return values

    def wait_idle(self, timeout: float = 20) -> dict[str, float]:
        """Metrics once nothing runs or waits (or fail after timeout seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.metrics()
            idle = values["gemma2:num_requests_running"] == 0 and values["gemma2:num_requests_waiting"] == 0
            if idle and values["gemma2:kv_rows_in_use"] == 0:
                return values
            if time.monotonic() > deadline:
                raise AssertionError(f"the server is still busy after {timeout} s: {values}")
            time.sleep(0.02)
