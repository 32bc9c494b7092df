"""Every refusal of `gemma2 serve`, in OpenAI's error shape with the right status, and the server serving on."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch
from live_server import MODEL_NAME, LiveServer

from gemma2.server.app import ServerState, build_app
from gemma2.server.prepare import ServerSettings

CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    torch.set_num_threads(1)
    with LiveServer(max_batch=4, max_model_len=256, max_body_bytes=64 * 1024) as live:
        yield live


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def still_serving(server: LiveServer) -> None:
    reply = server.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1


def test_malformed_json_is_a_400(server: LiveServer) -> None:
    for raw in (b"{", b"not json", b"", b'{"messages": [}'):
        error = error_of(server.post("/v1/chat/completions", content=raw), 400)
        assert error["type"] == "invalid_request_error"
    error_of(server.post("/v1/completions", content=b"[1, 2]"), 400)
    still_serving(server)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "hi"}]}, "messages"),
        ({"messages": CHAT, "temperature": "hot"}, "temperature"),
        ({"messages": CHAT, "temperature": 3}, "temperature"),
        ({"messages": CHAT, "top_p": 0}, "top_p"),
        ({"messages": CHAT, "max_tokens": -1}, "max_tokens"),
        ({"messages": CHAT, "max_tokens": 1.5}, "max_tokens"),
        ({"messages": CHAT, "n": 0}, "n"),
        ({"messages": CHAT, "stream": "yes"}, "stream"),
        ({"messages": CHAT, "stop": 5}, "stop"),
        ({"messages": CHAT, "presence_penalty": 5}, "presence_penalty"),
        ({"messages": CHAT, "logit_bias": {"x": 1}}, "logit_bias"),
        ({"messages": CHAT, "logit_bias": {"99999": 1}}, "logit_bias"),
        ({"messages": CHAT, "logit_bias": {"5": 1000}}, "logit_bias"),
        ({"messages": CHAT, "seed": "s"}, "seed"),
        ({"messages": CHAT, "stop_token_ids": [10**9]}, "stop_token_ids"),
    ],
)
def test_wrong_types_and_ranges_are_a_400_naming_the_field(server: LiveServer, body: dict, param: str) -> None:
    assert error_of(server.post("/v1/chat/completions", json=body), 400)["param"] == param


def test_n_and_logprobs_above_their_limits_are_a_400(server: LiveServer) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, n=5)  # 4 rows
    assert too_many.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="x", logprobs=21)
    still_serving(server)


def test_stream_options_without_stream_is_a_400(server: LiveServer) -> None:
    body = {"messages": CHAT, "stream_options": {"include_usage": True}}
    assert "stream_options" in error_of(server.post("/v1/chat/completions", json=body), 400)["message"]


def test_a_prompt_past_the_context_is_a_400_context_length_exceeded_and_never_queued(server: LiveServer) -> None:
    before = server.metrics()
    long_ids = list(range(10, 260))  # 250 tokens; the server's context is 256
    error = error_of(server.post("/v1/completions", json={"prompt": long_ids, "max_tokens": 10}), 400)
    assert error["code"] == "context_length_exceeded" and "256" in error["message"] and "260" in error["message"]
    chat = [{"role": "user", "content": "word " * 400}]
    error = error_of(server.post("/v1/chat/completions", json={"messages": chat}), 400)
    assert error["code"] == "context_length_exceeded"
    after = server.metrics()
    assert after["gemma2:request_queue_time_seconds_count"] == before["gemma2:request_queue_time_seconds_count"]
    fits = server.post("/v1/completions", json={"prompt": long_ids, "max_tokens": 6, "temperature": 0})
    assert fits.status_code == 200 and fits.json()["usage"]["total_tokens"] <= 256


def test_an_unknown_model_is_a_404(server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        server.client().chat.completions.create(model="gpt-4o", messages=CHAT)
    assert missing.value.body["code"] == "model_not_found"
    error_of(server.post("/tokenize", json={"model": "other", "prompt": "x"}), 404)
    error_of(server.get("/v2/nothing"), 404)
    error_of(server.get("/v1/chat/completions"), 405)


def test_gemma_chat_rules_are_400s_naming_the_message(server: LiveServer) -> None:
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert "messages[1]" in error_of(server.post("/v1/chat/completions", json={"messages": twice}), 400)["message"]
    late = [*CHAT, {"role": "assistant", "content": "hi"}, {"role": "system", "content": "be brief"}]
    assert "messages[2]" in error_of(server.post("/v1/chat/completions", json={"messages": late}), 400)["message"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert "image_url" in error_of(server.post("/v1/chat/completions", json={"messages": image}), 400)["message"]


def test_a_system_message_is_merged_or_refused_by_the_servers_policy(server: LiveServer) -> None:
    system = [{"role": "system", "content": "Answer briefly."}, *CHAT]
    merged = server.post("/v1/chat/completions", json={"messages": system, "max_tokens": 2, "temperature": 0})
    assert merged.status_code == 200
    tokens = server.post("/tokenize", json={"messages": system}).json()["tokens"]
    assert merged.json()["usage"]["prompt_tokens"] == len(tokens)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    joined = server.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 2, "temperature": 0})
    plain = server.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "temperature": 0})
    assert joined.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    with LiveServer(max_batch=1, system_prompt="reject") as strict:
        error = error_of(strict.post("/v1/chat/completions", json={"messages": system}), 400)
        assert "system" in error["message"] and "messages[0]" in error["message"]


@pytest.mark.parametrize(
    "field",
    [
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"tool_choice": "required"},
        {"best_of": 3},
    ],
)
def test_fields_we_cannot_honour_are_a_400_that_says_so(server: LiveServer, field: dict) -> None:
    error = error_of(server.post("/v1/chat/completions", json={"messages": CHAT, **field}), 400)
    assert error["param"] == next(iter(field)) and "not supported" in error["message"]
    assert server.post("/v1/completions", json={"prompt": "x", "suffix": "y"}).status_code == 400
    ok = {"messages": CHAT, "max_tokens": 1, "response_format": {"type": "text"}, "unknown_field": [1, 2]}
    assert server.post("/v1/chat/completions", json=ok).status_code == 200


def test_an_oversized_body_is_a_413(server: LiveServer) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 100_000}]}
    error_of(server.post("/v1/chat/completions", json=big), 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}]}'

    error_of(server.post("/v1/chat/completions", content=chunked()), 413)
    still_serving(server)


def test_an_api_key_is_required_when_set_except_on_probes() -> None:
    with LiveServer(max_batch=1, api_key="sesame") as locked:
        with pytest.raises(openai.AuthenticationError):
            locked.client(api_key="wrong").chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=1)
        assert error_of(locked.post("/v1/models"), 401)["type"] == "authentication_error"
        reply = locked.client(api_key="sesame").chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=1)
        assert reply.usage.completion_tokens == 1
        assert locked.get("/health").status_code == 200 and locked.get("/metrics").status_code == 200


def test_loading_and_draining_answer_503() -> None:
    settings = ServerSettings(model_name=MODEL_NAME, max_model_len=64, max_batch=1, vocab_size=100)
    state = ServerState(settings)

    async def ask() -> tuple[int, int, str | None]:
        transport = httpx.ASGITransport(app=build_app(state))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            health = await client.get("/health")
            chat = await client.post("/v1/chat/completions", json={"messages": CHAT})
            return health.status_code, chat.status_code, chat.headers.get("retry-after")

    assert asyncio.run(ask()) == (503, 503, "1")


def test_draining_refuses_new_requests_with_503(server: LiveServer) -> None:
    server.state.draining = True
    try:
        assert error_of(server.get("/health"), 503)["type"] == "unavailable_error"
        error_of(server.post("/v1/chat/completions", json={"messages": CHAT}), 503)
    finally:
        server.state.draining = False
    still_serving(server)


def random_body(rng: random.Random) -> bytes:
    """Bodies a confused client might send: wrong types, odd nesting, broken JSON, huge numbers."""
    values: list[Any] = [None, True, -1, 0, 2**70, 1e308, float("nan"), "", "x", [], {}, [1, "a"], {"a": None}]
    fields = [
        "messages",
        "prompt",
        "max_tokens",
        "temperature",
        "n",
        "stop",
        "stream",
        "logprobs",
        "top_logprobs",
        "seed",
        "logit_bias",
        "stream_options",
        "top_p",
        "top_k",
        "echo",
        "stop_token_ids",
        "model",
    ]
    body: dict[str, Any] = {}
    if rng.random() < 0.7:
        body["messages" if rng.random() < 0.5 else "prompt"] = rng.choice(
            [CHAT, "hi", [1, 2, 3], [[1], [2]], [{"role": "user"}], [{"role": 5, "content": []}]]
        )
    for name in rng.sample(fields, rng.randint(1, 4)):
        body[name] = rng.choice(values)
    text = json.dumps(body, allow_nan=True)
    if rng.random() < 0.15:
        text = text[: rng.randint(0, len(text))]
    return text.encode()


def test_fuzzed_bodies_never_get_a_5xx(server: LiveServer) -> None:
    rng = random.Random(0)
    statuses = []
    for _ in range(150):
        path = rng.choice(["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"])
        response = server.post(path, content=random_body(rng), headers={"content-type": "application/json"})
        assert response.status_code < 500, (path, response.text)
        if response.status_code != 200:
            error_of(response, response.status_code)
        statuses.append(response.status_code)
    assert statuses.count(400) > 100
    still_serving(server)


@pytest.mark.parametrize("stream", [True, False])
def test_an_engine_failure_mid_request_is_an_error_and_the_server_serves_on(
    server: LiveServer, stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = server.worker.engine
    real_step = engine.step
    steps = {"count": 0}

    def failing_step() -> Any:
        steps["count"] += 1
        if steps["count"] == 4:  # the prompt is read and a few tokens are out
            raise RuntimeError("simulated failure")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    body = {"messages": CHAT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": stream}
    response = server.post("/v1/chat/completions", json=body)
    if stream:  # the stream had begun with a 200: an error event, then [DONE]
        assert response.status_code == 200
        events = [e[len("data: ") :] for e in response.text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "internal_error" and "simulated failure" in error["message"]
        chunks = [json.loads(e) for e in events[:-2]]
        assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks)  # text came first
    else:
        error = error_of(response, 500)
        assert error["type"] == "internal_error" and "simulated failure" in error["message"]
    assert steps["count"] > 4  # the engine thread kept stepping after the failure
    server.wait_idle()
    still_serving(server)
