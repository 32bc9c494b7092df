"""`gemma2 serve --tp 2` under torchrun: rank 0 serves HTTP, rank 1 follows its steps, and the answers
are those of one process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer

BIN = Path(sys.executable).parent
REQUESTS: list[dict[str, Any]] = [
    {"prompt": "import os", "max_tokens": 12, "temperature": 0},
    {"prompt": "The json module", "max_tokens": 20, "temperature": 0},
    {"prompt": [2, 651, 1645], "max_tokens": 5, "temperature": 0},
    {"prompt": "def main():", "max_tokens": 10, "temperature": 0.9, "seed": 11, "n": 2},
    {"prompt": "class Path", "max_tokens": 8, "temperature": 0, "logprobs": 2, "echo": True},
]


class TorchrunServer:
    def __init__(self) -> None:
        command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "gemma2", "serve"]
        command += ["--port", "0", "--dtype", "fp32", "--tp", "2", "--max-batch", "4", "--shutdown-timeout", "30"]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "GEMMA2_DIST_TIMEOUT": "120"}
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        self.port = 0
        found = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.lines.append(line)
                match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
                if match:
                    self.port = int(match.group(1))
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        assert found.wait(120), f"no 'listening on' line: {self.lines[-10:]}"
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while httpx.get(f"{self.url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, f"not ready: {self.lines[-10:]}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def tp_server() -> Iterator[TorchrunServer]:
    server = TorchrunServer()
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait(30)


def answers(url: str) -> list[Any]:
    """The requests sent at once (they share batches), each answer's choices."""
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        replies = list(pool.map(lambda body: httpx.post(f"{url}/v1/completions", json=body, timeout=120), REQUESTS))
    for reply in replies:
        assert reply.status_code == 200, reply.text
    return [[(c["text"], c["finish_reason"], c["logprobs"]) for c in r.json()["choices"]] for r in replies]


def test_the_sharded_server_answers_as_one_process_does(tp_server: TorchrunServer) -> None:
    with LiveServer() as alone:
        expected = answers(alone.url)
    got = answers(tp_server.url)
    for body, mine, theirs in zip(REQUESTS, got, expected):
        assert [(t, f) for t, f, _ in mine] == [(t, f) for t, f, _ in theirs], body
        for (_, _, a), (_, _, b) in zip(mine, theirs):
            if a is not None:
                assert a["tokens"] == b["tokens"]
                assert a["token_logprobs"][1:] == pytest.approx(b["token_logprobs"][1:], abs=1e-4)


def test_a_client_gone_mid_stream_leaves_the_ranks_in_step(tp_server: TorchrunServer) -> None:
    body = {"prompt": "import sys", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{tp_server.url}/v1/completions", json=body, timeout=60) as response:
        for count, _ in enumerate(response.iter_lines()):
            if count > 5:
                break  # the connection closes: the server aborts the request on both ranks
    reply = httpx.post(f"{tp_server.url}/v1/completions", json=REQUESTS[0], timeout=60)
    assert reply.status_code == 200


def test_sigterm_drains_and_every_rank_exits(tp_server: TorchrunServer) -> None:
    tp_server.process.send_signal(signal.SIGTERM)
    tp_server.process.wait(90)
    assert any("draining" in line for line in tp_server.lines), tp_server.lines[-10:]
    assert not any("Traceback" in line for line in tp_server.lines if "gemma2" in line)
