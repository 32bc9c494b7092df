"""One HTTP request in flight: its jobs on the engine thread (one per prompt), its choices' text, its end.

`Call.updates()` turns the engine's events into (choice index, new text, finished) and ends a
choice whose text reached a stop string (aborting it on the engine: its row is free before the
next step). Whatever way the HTTP side leaves (done, client gone, error), `close()` aborts what
still runs and logs one line for the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from functools import lru_cache

from gemma2.errors import InputError
from gemma2.server.choices import ChoiceText, TokenInfo
from gemma2.server.errors import APIError, bad_request, unavailable
from gemma2.server.prepare import Prepared
from gemma2.server.responses import (
    ChatLogprobs,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from gemma2.server.worker import Draining, EngineWorker, Job, QueueFull
from gemma2.tokenizer import Gemma2Tokenizer

log = logging.getLogger("gemma2.server")


class Call:
    def __init__(self, request_id: str, prepared: Prepared, tokenizer: Gemma2Tokenizer, worker: EngineWorker) -> None:
        self.request_id = request_id
        self.prepared = prepared
        self.tokenizer = tokenizer
        self.worker = worker
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.jobs = [
            Job(f"{request_id}-{p}", prompt.ids, params, loop, self.queue, tag=p)
            for p, (prompt, params) in enumerate(zip(prepared.prompts, prepared.params))
        ]
        n = prepared.choice_count
        self.choices = {
            p * n + j: ChoiceText(tokenizer, prepared.stops) for p in range(len(self.jobs)) for j in range(n)
        }
        self.prompt_logprobs: dict[int, list[tuple[float, list[tuple[int, float]]]]] = {}
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.closed = False
        self.token_text = token_text_of(tokenizer)
        self.text_offsets: dict[int, int] = {}  # per choice: where its next logprobs entry's text starts

    # ---- the engine side ------------------------------------------------------------------

    def submit(self) -> None:
        submitted: list[Job] = []
        try:
            for job in self.jobs:
                self.worker.submit(job)
                submitted.append(job)
        except (QueueFull, Draining) as error:
            for job in submitted:
                self.worker.abort(job)
            self.closed = True
            if isinstance(error, Draining):
                self.worker.metrics.rejected("shutting_down")
                raise unavailable("the server is shutting down") from None
            self.worker.metrics.rejected("queue_full")
            raise APIError(
                429, "the server's queue is full; retry shortly", type="rate_limit_error", headers={"Retry-After": "1"}
            ) from None

    async def updates(self) -> AsyncIterator[tuple[int, str, bool]]:
        """(choice index, text to show, finished) until every choice is done."""
        n = self.prepared.choice_count
        open_choices = len(self.choices)
        while open_choices:
            tag, index, event = await self.queue.get()
            if isinstance(event, InputError):
                raise bad_request(str(event))
            if isinstance(event, Exception):
                raise APIError(500, str(event), type="internal_error")
            choice = self.choices[tag * n + index]
            if choice.finished:
                continue
            if event.prompt_logprobs is not None:
                self.prompt_logprobs[tag] = event.prompt_logprobs
            if event.token_id is not None and self.first_token is None:
                self.first_token = time.perf_counter()
            text = choice.push(event)
            if choice.finished:
                open_choices -= 1
                if not event.finished:  # a stop string: the engine would go on
                    self.worker.abort(self.jobs[tag], [index], reason="stop")
            yield tag * n + index, text, choice.finished

    def close(self) -> None:
        """Abort whatever still runs (a client gone, an error) and log the request's one line."""
        if self.closed:
            return
        self.closed = True
        if not all(c.finished for c in self.choices.values()):
            for job in self.jobs:
                self.worker.abort(job)
        usage = self.usage()
        ttft = "-" if self.first_token is None else f"{self.first_token - self.started:.3f}s"
        reasons = sorted({c.finish_reason or "abort" for c in self.choices.values()})
        log.info(
            "%s %s prompt_tokens=%d completion_tokens=%d ttft=%s total=%.3fs finish=%s",
            self.request_id,
            self.prepared.kind,
            usage.prompt_tokens,
            usage.completion_tokens,
            ttft,
            time.perf_counter() - self.started,
            ",".join(reasons),
        )

    # ---- what the response shows ----------------------------------------------------------

    def usage(self) -> Usage:
        prompt = sum(len(p.ids) for p in self.prepared.prompts)
        return Usage.of(prompt, sum(c.completion_tokens for c in self.choices.values()))

    def prompt_of(self, index: int) -> int:
        return index // self.prepared.choice_count

    def chat_logprobs(self, tokens: list[TokenInfo]) -> ChatLogprobs | None:
        if self.prepared.logprobs is None:
            return None
        return ChatLogprobs(content=[self._chat_entry(t) for t in tokens])

    def _chat_entry(self, token: TokenInfo) -> TokenLogprob:
        text = self.token_text(token.token_id)
        top = [
            TopLogprob(token=self.token_text(i), logprob=v, bytes=list(self.token_text(i).encode()))
            for i, v in (token.top or [])[: self.prepared.logprobs]
        ]
        return TokenLogprob(token=text, logprob=token.logprob or 0.0, bytes=list(text.encode()), top_logprobs=top)

    def completion_logprobs(self, index: int, tokens: list[TokenInfo], echo: bool) -> CompletionLogprobs | None:
        """The legacy shape; with echo, the prompt's tokens first (the first has no log probability).
        text_offset counts from the choice's first entry, also across a stream's chunks."""
        if self.prepared.logprobs is None:
            return None
        entries: list[TokenInfo] = []
        if echo:
            prompt = self.prepared.prompts[self.prompt_of(index)].ids
            scored = self.prompt_logprobs.get(self.prompt_of(index), [])
            entries.append(TokenInfo(prompt[0], None, None))
            entries += [TokenInfo(i, lp, top) for i, (lp, top) in zip(prompt[1:], scored)]
        entries += tokens
        out = CompletionLogprobs()
        offset = self.text_offsets.get(index, 0)
        for entry in entries:
            text = self.token_text(entry.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(entry.logprob)
            top: dict[str, float] | None = None
            if entry.top is not None:  # several ids can show as one text: the likelier one is kept
                top = {}
                for i, v in entry.top[: self.prepared.logprobs]:
                    top.setdefault(self.token_text(i), v)
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(text)
        self.text_offsets[index] = offset
        return out


def token_text_of(tokenizer: Gemma2Tokenizer) -> Callable[[int], str]:
    """A cached id -> text of that token alone (special tokens shown, as logprobs name them)."""

    @lru_cache(maxsize=65536)
    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    return token_text
