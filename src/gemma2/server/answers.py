"""The answer to a chat or completions call: one JSON body, or a server-sent event stream.

A stream sends, per choice, a role chunk first (chat), then content deltas, then exactly one chunk
with its finish reason; then a usage chunk with `choices: []` when `stream_options.include_usage`
asks; then `data: [DONE]`. Every chunk has the call's id. An error once the stream has begun is an
error event followed by `data: [DONE]`. A non-streamed call returns when every choice is done,
or stops (aborting its rows) when the client goes away first.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gemma2.server.calls import Call
from gemma2.server.errors import APIError
from gemma2.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    Delta,
    dump,
    now,
)

log = logging.getLogger("gemma2.server")


async def answer(call: Call, request: Request, model_name: str) -> Response:
    call.submit()  # 429 or 503 here, before any byte is sent
    if call.prepared.stream:
        events = (
            _chat_stream(call, model_name) if call.prepared.kind == "chat" else _completion_stream(call, model_name)
        )
        return StreamingResponse(
            _sse(call, events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    collect = asyncio.ensure_future(_collect(call))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():  # the client left: free its rows now
            collect.cancel()
            return Response(status_code=499)
        await collect
    finally:
        gone.cancel()
        call.close()
    body = _chat_body(call, model_name) if call.prepared.kind == "chat" else _completion_body(call, model_name)
    return JSONResponse(body)


async def _collect(call: Call) -> None:
    async for _ in call.updates():
        pass


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _sse(call: Call, events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    except APIError as error:
        yield f"data: {json.dumps(error.body())}\n\n"
    except Exception as error:  # a bug: say so on the stream, which has already begun with a 200
        log.exception("stream failed")
        yield f"data: {json.dumps(APIError(500, str(error), type='internal_error').body())}\n\n"
    finally:
        call.close()  # also when the client is gone (the task is cancelled): its rows are freed
    yield "data: [DONE]\n\n"


# ---- chat ------------------------------------------------------------------------------------


def _chat_body(call: Call, model_name: str) -> dict[str, Any]:
    choices = [
        ChatChoice(
            index=index,
            message=AssistantMessage(content=choice.text),
            logprobs=call.chat_logprobs(choice.all_tokens()),
            finish_reason=choice.finish_reason,
        )
        for index, choice in call.choices.items()
    ]
    return dump(
        ChatCompletion(id=call.request_id, created=now(), model=model_name, choices=choices, usage=call.usage())
    )


async def _chat_stream(call: Call, model_name: str) -> AsyncIterator[dict[str, Any]]:
    created = now()

    def chunk(choices: list[ChatChunkChoice], usage: Any = None) -> dict[str, Any]:
        return dump(
            ChatCompletionChunk(id=call.request_id, created=created, model=model_name, choices=choices, usage=usage)
        )

    for index in call.choices:
        yield chunk([ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
    async for index, text, finished in call.updates():
        choice = call.choices[index]
        if not text and not finished:
            continue
        tokens = choice.all_tokens() if finished else choice.take_tokens()
        delta = Delta(content=text) if text else Delta()
        reason = choice.finish_reason if finished else None
        yield chunk(
            [ChatChunkChoice(index=index, delta=delta, logprobs=call.chat_logprobs(tokens), finish_reason=reason)]
        )
    if call.prepared.include_usage:
        yield chunk([], usage=call.usage())


# ---- completions -----------------------------------------------------------------------------


def _completion_body(call: Call, model_name: str) -> dict[str, Any]:
    echo = call.prepared.echo
    choices = []
    for index, choice in call.choices.items():
        prefix = call.prepared.prompts[call.prompt_of(index)].text if echo else ""
        choices.append(
            CompletionChoice(
                index=index,
                text=prefix + choice.text,
                logprobs=call.completion_logprobs(index, choice.all_tokens(), echo),
                finish_reason=choice.finish_reason,
            )
        )
    return dump(Completion(id=call.request_id, created=now(), model=model_name, choices=choices, usage=call.usage()))


async def _completion_stream(call: Call, model_name: str) -> AsyncIterator[dict[str, Any]]:
    created = now()
    echoed: set[int] = set()

    def chunk(choices: list[CompletionChoice], usage: Any = None) -> dict[str, Any]:
        return dump(Completion(id=call.request_id, created=created, model=model_name, choices=choices, usage=usage))

    async for index, text, finished in call.updates():
        choice = call.choices[index]
        echo = call.prepared.echo and index not in echoed
        if echo:  # the prompt comes first, with its log probabilities (they arrive with the first event)
            echoed.add(index)
            text = call.prepared.prompts[call.prompt_of(index)].text + text
        if not text and not finished:
            continue
        tokens = choice.all_tokens() if finished else choice.take_tokens()
        logprobs = call.completion_logprobs(index, tokens, echo)
        reason = choice.finish_reason if finished else None
        yield chunk([CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)])
    if call.prepared.include_usage:
        yield chunk([], usage=call.usage())
