"""`gemma2 serve` under load: concurrent clients, chunked prefill, clients that leave, a full queue, metrics."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch
from live_server import MODEL_NAME, LiveServer, demo

LONG = {"max_tokens": 900, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    torch.set_num_threads(1)
    with LiveServer(max_batch=4, prefill_chunk=64) as live:
        yield live


def mixed_requests(seed: int) -> list[tuple[str, dict[str, Any]]]:
    """Chat and completions, short and long prompts (one past the demo model's 128-token window)."""
    rng = random.Random(seed)
    words = "the file object returns a list of strings when the module is imported by name".split()  # noqa: SIM905
    requests = []
    for i in range(16):
        length = [3, 12, 40, 300][i % 4]
        text = " ".join(rng.choice(words) for _ in range(length))
        max_tokens = rng.randint(4, 20)
        if i % 2:
            requests.append(("chat", {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}))
        else:
            requests.append(("completion", {"prompt": text, "max_tokens": max_tokens}))
    return requests


async def send(client: Any, kind: str, body: dict[str, Any]) -> tuple[str, int]:
    if kind == "chat":
        reply = await client.chat.completions.create(model=MODEL_NAME, **body)
        return reply.choices[0].message.content, reply.usage.completion_tokens
    reply = await client.completions.create(model=MODEL_NAME, **body)
    return reply.choices[0].text, reply.usage.completion_tokens


def run_all(server: LiveServer, requests: list[tuple[str, dict[str, Any]]], at_once: bool) -> list[tuple[str, int]]:
    async def main() -> list[tuple[str, int]]:
        client = server.async_client(timeout=120)
        try:
            if at_once:
                return list(await asyncio.gather(*(send(client, k, b) for k, b in requests)))
            return [await send(client, k, b) for k, b in requests]
        finally:
            await client.close()

    return asyncio.run(main())


def test_sixteen_clients_on_four_rows_get_the_answers_they_get_alone(server: LiveServer) -> None:
    requests = [(k, {**b, "temperature": 0}) for k, b in mixed_requests(0)]
    alone = run_all(server, requests, at_once=False)
    together = run_all(server, requests, at_once=True)
    assert together == alone
    assert server.wait_idle()["gemma2:kv_rows_in_use"] == 0


def test_seeded_sampling_is_the_same_alone_and_under_load(server: LiveServer) -> None:
    requests = [
        (k, {**b, "temperature": 0.9, "top_p": 0.95, "seed": 100 + i}) for i, (k, b) in enumerate(mixed_requests(1))
    ]
    alone = run_all(server, requests, at_once=False)
    together = run_all(server, requests, at_once=True)
    assert together == alone
    assert len({text for text, _ in alone}) > 8  # real samples, not one answer


def test_metrics_count_exactly_what_was_served(server: LiveServer) -> None:
    before = server.wait_idle()
    prompt_ids = demo()[1].encode("The json module")
    for _ in range(3):
        reply = server.client().completions.create(
            model=MODEL_NAME, prompt="The json module", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
        )
        assert reply.usage.completion_tokens == 5
    after = server.wait_idle()

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew("gemma2:request_success_total{finished_reason=length}") == 3
    assert grew("gemma2:prompt_tokens_total") == 3 * len(prompt_ids)
    assert grew("gemma2:generation_tokens_total") == 15
    assert grew("gemma2:time_to_first_token_seconds_count") == 3
    assert grew("gemma2:inter_token_latency_seconds_count") == 3 * 4
    assert grew("gemma2:e2e_request_latency_seconds_count") == 3
    assert grew("gemma2:request_queue_time_seconds_count") == 3
    assert after["gemma2:kv_rows_total"] == 4


def test_a_long_prompt_is_read_in_chunks_while_a_running_stream_keeps_going(server: LiveServer) -> None:
    """A 900-token prompt at 64 tokens a step takes 15 steps: the running stream gets a token in each."""
    client = server.client(timeout=120)
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt="The json module",
        stream=True,
        max_tokens=400,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    arrivals: list[float] = []
    first_long: list[float] = []
    started = threading.Event()

    def read() -> None:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                arrivals.append(time.perf_counter())
                started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(30)
    sent = time.perf_counter()
    long_ids = [random.Random(3).randrange(10, 7900) for _ in range(900)]
    long = client.completions.create(model=MODEL_NAME, prompt=long_ids, max_tokens=1, temperature=0, stream=True)
    for chunk in long:
        if chunk.choices and chunk.choices[0].text and not first_long:
            first_long.append(time.perf_counter())
    reader.join(120)
    during = [t for t in arrivals if sent < t < first_long[0]]
    assert len(during) >= 10, f"the running stream got {len(during)} tokens while 900 prompt tokens were read"


def open_stream_and_close(server: LiveServer) -> None:
    """A client that reads the start of a stream, then closes its socket."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = httpx.Request("POST", f"{server.url}/v1/completions", json={"prompt": "import os", "stream": True, **LONG})
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    payload = body.read()
    sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(65536)
    assert b"200 OK" in received
    sock.close()


def test_a_client_closing_its_socket_mid_stream_frees_its_row(server: LiveServer) -> None:
    before = server.wait_idle()
    open_stream_and_close(server)
    after = server.wait_idle(timeout=10)
    assert after["gemma2:requests_aborted_total"] == before["gemma2:requests_aborted_total"] + 1
    started = time.perf_counter()
    reply = server.client().completions.create(model=MODEL_NAME, prompt="import os", max_tokens=5, temperature=0)
    assert reply.usage.completion_tokens >= 1 and time.perf_counter() - started < 5


@pytest.mark.parametrize("stream", [False, True])
def test_clients_that_time_out_free_their_rows(server: LiveServer, stream: bool) -> None:
    """Six clients at once on four rows give up after 0.5 s (a timeout, or a stream dropped part way)."""
    before = server.wait_idle()

    async def give_up(client: Any) -> None:
        body: dict[str, Any] = dict(
            model=MODEL_NAME, prompt="import os", max_tokens=900, temperature=0, extra_body={"ignore_eos": True}
        )
        if not stream:
            with pytest.raises(openai.APITimeoutError):
                await client.completions.create(**body, timeout=0.5)
            return
        async with await client.completions.create(**body, stream=True) as chunks:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(_drain(chunks), 0.5)

    async def main() -> None:
        client = server.async_client(timeout=60)
        try:
            await asyncio.gather(*(give_up(client) for _ in range(6)))
        finally:
            await client.close()

    asyncio.run(main())
    after = server.wait_idle(timeout=15)
    assert after["gemma2:requests_aborted_total"] - before["gemma2:requests_aborted_total"] == 6
    started = time.perf_counter()
    reply = server.client().completions.create(model=MODEL_NAME, prompt="import os", max_tokens=5, temperature=0)
    assert reply.usage.completion_tokens >= 1 and time.perf_counter() - started < 5


async def _drain(chunks: Any) -> None:
    async for _ in chunks:
        pass


def test_a_full_queue_answers_429_with_retry_after_and_serves_on() -> None:
    with LiveServer(max_batch=1, max_queue=1) as live:
        client = live.client(timeout=60)
        holder = client.completions.create(
            model=MODEL_NAME, prompt="import os", stream=True, max_tokens=900, extra_body={"ignore_eos": True}
        )
        next(iter(holder))  # the one row is taken
        waiting = threading.Thread(
            target=lambda: client.completions.create(model=MODEL_NAME, prompt="import os", max_tokens=3, temperature=0)
        )
        waiting.start()
        deadline = time.monotonic() + 10
        while live.metrics()["gemma2:num_requests_waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = live.post("/v1/completions", json={"prompt": "import os", "max_tokens": 3})
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert live.metrics()["gemma2:requests_rejected_total{reason=queue_full}"] == 1
        holder.close()  # frees the row: the waiting request runs
        waiting.join(30)
        assert not waiting.is_alive()
        assert live.wait_idle()["gemma2:kv_rows_in_use"] == 0
        ok = live.post("/v1/completions", json={"prompt": "import os", "max_tokens": 3})
        assert ok.status_code == 200
