"""`gemma2 serve` through the real `openai` client (sync and async): answers are the library's, streams join to them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from live_server import MODEL_NAME, LiveServer, demo

from gemma2.generation import generate

CHAT = [{"role": "user", "content": "What does os.path.join do?"}]
PROMPT = "The json module"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    torch.set_num_threads(1)
    with LiveServer(max_batch=4) as live:
        yield live


def greedy(ids: list[int], max_new: int, stops: tuple[int, ...] = (1, 6)) -> list[int]:
    """The library's greedy tokens for a prompt alone (the stop token included when one ends it)."""
    model, _ = demo()
    out = generate(model, torch.tensor([ids]), max_new_tokens=max_new, eos_token_id=list(stops))
    new = out[0, len(ids) :].tolist()
    for i, token in enumerate(new):
        if token in stops:
            return new[: i + 1]
    return new


def chat_ids(messages: list[dict[str, Any]]) -> list[int]:
    return demo()[1].apply_chat_template(messages, add_generation_prompt=True)


def text_of(tokens: list[int]) -> str:
    return demo()[1].decode([t for t in tokens if t not in (1, 6)], skip_special_tokens=True)


def test_chat_completion_is_the_librarys_greedy_answer_with_exact_usage(server: LiveServer) -> None:
    reply = server.client().chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=24, temperature=0)
    expected = greedy(chat_ids(CHAT), 24)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == MODEL_NAME
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text_of(expected)
    assert reply.choices[0].finish_reason == ("stop" if expected[-1] in (1, 6) else "length")
    assert reply.usage.prompt_tokens == len(chat_ids(CHAT))
    assert reply.usage.completion_tokens == len(expected)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_model_name_is_optional_but_the_bos_is_single(server: LiveServer) -> None:
    ids = demo()[1].encode(PROMPT)
    body = server.post("/v1/completions", json={"prompt": "<bos>" + PROMPT, "max_tokens": 5, "temperature": 0}).json()
    assert body["usage"]["prompt_tokens"] == len(ids)  # one <bos>, not two
    assert body["choices"][0]["text"] == text_of(greedy(ids, 5))


def test_completions_take_a_string_token_ids_and_lists_of_both(server: LiveServer) -> None:
    client = server.client()
    ids = demo()[1].encode(PROMPT)
    other = demo()[1].encode("import os")
    expected = text_of(greedy(ids, 10))
    by_text = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=10, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text == expected
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)
    many = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, "import os"], max_tokens=10, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert [c.text for c in many.choices] == [expected, text_of(greedy(other, 10))]
    assert many.usage.prompt_tokens == len(ids) + len(other)
    lists = client.completions.create(model=MODEL_NAME, prompt=[ids, other], max_tokens=10, temperature=0)
    assert [c.text for c in lists.choices] == [c.text for c in many.choices]


def join_stream(chunks: list[Any], n: int) -> tuple[list[str], list[str | None]]:
    texts, reasons = [""] * n, [None] * n
    for chunk in chunks:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] += piece or ""
            if choice.finish_reason is not None:
                assert reasons[choice.index] is None, "two chunks with a finish reason for one choice"
                reasons[choice.index] = choice.finish_reason
    return texts, reasons


@pytest.mark.parametrize("n", [1, 3])
def test_a_chat_stream_joins_to_the_answer_with_the_role_first_and_usage_last(server: LiveServer, n: int) -> None:
    client = server.client()
    kwargs: dict[str, Any] = dict(model=MODEL_NAME, messages=CHAT, max_tokens=20, n=n, seed=7, temperature=0.8)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    roles = [c for c in chunks[:n]]
    assert sorted(c.choices[0].index for c in roles) == list(range(n))
    assert all(c.choices[0].delta.role == "assistant" for c in roles)
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    texts, reasons = join_stream(chunks[:-1], n)
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]


def test_a_completion_stream_joins_to_the_answer(server: LiveServer) -> None:
    client = server.client()
    kwargs: dict[str, Any] = dict(model=MODEL_NAME, prompt=[PROMPT, "import os"], max_tokens=16, temperature=0, n=2)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    texts, reasons = join_stream(chunks, 4)
    assert texts == [c.text for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("echo", [False, True])
def test_a_streamed_completions_logprobs_join_to_the_answers_with_offsets_that_run_on(
    server: LiveServer, echo: bool
) -> None:
    client = server.client()
    kwargs: dict[str, Any] = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2, echo=echo)
    whole = client.completions.create(**kwargs).choices[0]
    joined: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "text_offset": []}
    pieces = 0
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                pieces += 1
                for key, values in joined.items():
                    values += getattr(choice.logprobs, key)
    assert whole.logprobs is not None
    assert joined["tokens"] == whole.logprobs.tokens
    assert joined["token_logprobs"] == pytest.approx(whole.logprobs.token_logprobs)
    assert joined["text_offset"] == whole.logprobs.text_offset
    # Each offset is where its token's text starts in the joined token texts.
    starts = [sum(map(len, whole.logprobs.tokens[:i])) for i in range(len(whole.logprobs.tokens))]
    assert whole.logprobs.text_offset == starts
    assert pieces >= 3  # the offsets ran on across chunks


def test_the_raw_stream_is_server_sent_events_ending_in_done(server: LiveServer) -> None:
    body = {"messages": CHAT, "max_tokens": 5, "temperature": 0, "stream": True}
    response = server.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
    }


def stop_across_tokens(tokens: list[int]) -> tuple[str, str]:
    """A stop string made of the end of one token and the start of the next, and the text before it."""
    tokenizer = demo()[1]
    for k in range(2, len(tokens) - 1):
        before = tokenizer.decode(tokens[:k], skip_special_tokens=True)
        after = tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)
        piece = after[len(before) :]
        if len(before) >= 2 and len(piece) >= 2 and before[-2:].strip() and piece[:2].strip():
            stop = before[-2:] + piece[:2]
            return stop, after[: after.find(stop)]
    raise AssertionError("no two adjacent tokens to build a stop string from")


def test_a_stop_string_split_across_tokens_is_cut_in_the_answer_and_in_the_stream(server: LiveServer) -> None:
    client = server.client()
    ids = demo()[1].encode(PROMPT)
    tokens = greedy(ids, 30)
    stop, before = stop_across_tokens(tokens)
    kwargs: dict[str, Any] = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=30, temperature=0)
    whole = client.completions.create(**kwargs, stop=[stop, "never-there"])
    assert whole.choices[0].text == before and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < len(tokens)
    texts, reasons = join_stream(list(client.completions.create(**kwargs, stop=stop, stream=True)), 1)
    assert texts == [before] and reasons == ["stop"]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=30, temperature=0)
    chat_stop, chat_before = stop_across_tokens(greedy(chat_ids(CHAT), 30))
    if chat_stop in chat.choices[0].message.content:
        cut = client.chat.completions.create(
            model=MODEL_NAME, messages=CHAT, max_tokens=30, temperature=0, stop=chat_stop
        )
        assert cut.choices[0].message.content == chat_before


def test_stop_token_ids_end_a_choice_without_showing_the_token(server: LiveServer) -> None:
    ids = demo()[1].encode(PROMPT)
    tokens = greedy(ids, 12)
    stop_id = tokens[3]
    first = tokens.index(stop_id)
    reply = server.client().completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"stop_token_ids": [stop_id]}
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == text_of(tokens[:first])
    assert reply.usage.completion_tokens == first + 1


def test_n_choices_share_one_prompt_and_a_seed_repeats_them(server: LiveServer) -> None:
    client = server.client()
    kwargs: dict[str, Any] = dict(model=MODEL_NAME, messages=CHAT, max_tokens=12, n=3, temperature=1.0, seed=123)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1, "three samples at temperature 1 were all equal"
    assert first.usage.prompt_tokens == len(chat_ids(CHAT))  # the prompt is counted (and read) once
    greedy_n = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=12, n=3, temperature=0)
    assert len({c.message.content for c in greedy_n.choices}) == 1


def full_log_softmax(ids: list[int]) -> torch.Tensor:
    model, _ = demo()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_chat_logprobs_are_the_models_log_softmax(server: LiveServer) -> None:
    reply = server.client().chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5
    )
    ids = chat_ids(CHAT)
    tokens = greedy(ids, 8)
    content = reply.choices[0].logprobs.content
    shown = [t for t in tokens if t not in (1, 6)]
    assert len(content) == len(shown)
    table = full_log_softmax(ids + tokens)
    tokenizer = demo()[1]
    for i, entry in enumerate(content):
        row = table[len(ids) - 1 + i]
        assert entry.token == tokenizer.decode([shown[i]])
        assert entry.logprob == pytest.approx(float(row[shown[i]]), abs=1e-4)
        assert len(entry.top_logprobs) == 5
        best = torch.topk(row, 5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
    assert "".join(e.token for e in content) == reply.choices[0].message.content


def test_echo_scores_the_prompt_for_evaluation_harnesses(server: LiveServer) -> None:
    ids = demo()[1].encode(PROMPT)
    reply = server.client().completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    choice = reply.choices[0]
    assert choice.text == PROMPT and reply.usage.completion_tokens == 0
    table = full_log_softmax(ids)
    assert choice.logprobs.token_logprobs[0] is None
    expected = [float(table[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert len(choice.logprobs.tokens) == len(ids)
    with_new = server.client().completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=3, echo=True, logprobs=2, temperature=0
    )
    assert with_new.choices[0].text.startswith(PROMPT)
    assert len(with_new.choices[0].logprobs.tokens) == len(ids) + 3
    assert all(len(top) <= 2 for top in with_new.choices[0].logprobs.top_logprobs[1:])


def test_the_async_client_chats_and_streams(server: LiveServer) -> None:
    async def run() -> tuple[str, str]:
        client = server.async_client()
        whole = await client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=10, temperature=0)
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=CHAT, max_tokens=10, temperature=0, stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await client.close()
        return whole.choices[0].message.content, "".join(pieces)

    whole, streamed = asyncio.run(run())
    assert whole == streamed == text_of(greedy(chat_ids(CHAT), 10))


def test_models_tokenize_detokenize_version_and_health(server: LiveServer) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert server.get("/health").json() == {"status": "ok"}
    assert server.get("/version").json()["version"]
    ids = demo()[1].encode(PROMPT)
    tokens = server.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["tokens"] == ids and tokens["count"] == len(ids)
    assert tokens["max_model_len"] == server.settings.max_model_len
    chat = server.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == chat_ids(CHAT)
    assert server.post("/detokenize", json={"tokens": ids[1:]}).json() == {"prompt": PROMPT}


def test_sampling_fields_change_the_answer_as_they_should(server: LiveServer) -> None:
    client = server.client()
    ids = demo()[1].encode(PROMPT)
    tokens = greedy(ids, 6)
    banned = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logit_bias={str(tokens[0]): -100}
    )
    assert banned.choices[0].text != text_of(tokens)
    assert not banned.choices[0].text.startswith(demo()[1].decode([tokens[0]]))
    forced = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0, logit_bias={"1000": 100}
    )
    assert forced.choices[0].text == demo()[1].decode([1000] * 3)
    # min_tokens holds the stop tokens back; ignore_eos drops them.
    long = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        logit_bias={"1": 100},
        extra_body={"min_tokens": 5},
    )
    assert long.usage.completion_tokens == 6 and long.choices[0].finish_reason == "stop"
    ignored = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        logit_bias={"1": 100},
        extra_body={"ignore_eos": True},
    )
    assert ignored.usage.completion_tokens == 8 and ignored.choices[0].finish_reason == "length"
    repeated = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=30, temperature=0, frequency_penalty=2.0, presence_penalty=2.0
    )
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=30, temperature=0)
    assert repeated.choices[0].text != plain.choices[0].text
    extras = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=4,
        temperature=0.7,
        top_p=0.9,
        seed=1,
        user="u",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "some_new_field": {"x": 1}},
    )
    assert extras.usage.completion_tokens >= 1
