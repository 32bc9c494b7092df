"""`gemma2 serve` as a process: it binds before loading, and SIGTERM drains it (503 for new work, exit 0)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest


class ServeProcess:
    def __init__(self, *args: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "gemma2", "serve", "--port", "0", "--dtype", "fp32", "--threads", "1", *args]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.port_found = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        assert self.port_found.wait(60), f"no 'listening on' line: {self.lines}"
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                self.port_found.set()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"not ready after {timeout} s: {self.lines}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        started.append(ServeProcess(*args))
        return started[-1]

    yield start
    for process in started:
        process.kill()


def stream_in_thread(url: str, max_tokens: int) -> tuple[threading.Thread, dict[str, Any], threading.Event]:
    """A streamed completion read in a thread: its chunks, and an event set at the first token."""
    result: dict[str, Any] = {"text": "", "finish": None, "usage": None, "done": False}
    first = threading.Event()
    body = {
        "prompt": "import os",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    def run() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    result["done"] = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    for choice in chunk["choices"]:
                        result["text"] += choice["text"]
                        result["finish"] = choice["finish_reason"] or result["finish"]
                        first.set()
                    result["usage"] = chunk.get("usage") or result["usage"]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result, first


def test_sigterm_lets_requests_in_flight_finish_refuses_new_ones_and_exits_0(serve: Any) -> None:
    server = serve("--shutdown-timeout", "60")
    server.wait_ready()
    thread, result, first = stream_in_thread(server.url, 150)
    assert first.wait(30)
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while httpx.get(f"{server.url}/health", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "/health did not turn 503 after SIGTERM"
        time.sleep(0.01)
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "unavailable_error"
    assert thread.is_alive(), "the request in flight ended before the checks (make it longer)"
    thread.join(60)
    assert result["done"] and result["finish"] == "length" and result["usage"]["completion_tokens"] == 150
    assert server.process.wait(30) == 0


def test_sigterm_aborts_what_outlives_the_shutdown_timeout(serve: Any) -> None:
    server = serve("--shutdown-timeout", "0.5")
    server.wait_ready()
    thread, result, first = stream_in_thread(server.url, 1000)
    assert first.wait(30)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    assert time.monotonic() - started < 15
    thread.join(10)
    assert result["finish"] == "abort" and result["done"]
    assert any("draining" in line for line in server.lines)


def test_bad_options_are_one_line_errors(serve: Any) -> None:
    for args, message in [
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--max-model-len", "999999"], "--max-model-len must be in [1, 1024]"),
        (["--model", "/nonexistent/dir"], "/nonexistent/dir"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "gemma2", "serve", "--port", "0", *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
