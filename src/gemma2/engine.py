"""Continuous batching: requests join and leave a running batch between model steps. No HTTP, no I/O.

    engine = Engine(model, max_batch=8, max_length=None, prefill_chunk=512)
    rid = engine.add(prompt_ids, SamplingParams(max_new_tokens=64))
    while engine.has_unfinished():
        for event in engine.step():   # admit, read prompt chunks, decode every running row
            ...                       # event.request_id, .token_id, .logprob, .finished, .finish_reason
    engine.abort(rid)                 # the row is free before the next step
    ids = engine.add_group(prompt_ids, [params] * 3)  # three samples of one prompt, read once

The engine owns one `Gemma2Cache` whose rows are the batch: a request takes a row when one is
free (FIFO otherwise), its prompt is read `prefill_chunk` tokens per step so running rows keep
decoding meanwhile, then every decoding row advances in one batched forward pass, each at its
own position. A finished or aborted request gives its row back at once (its slots wiped).

Each request samples with its own settings and its own random generator, and row b of a batched
forward computes exactly what it would alone (masks are per row), so a request's tokens do not
depend on what else runs: greedy output equals the prompt alone in float32; in bf16 the matrix
kernels may round a row differently at another batch size (see the README for how often).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gemma2.cache import Gemma2Cache
from gemma2.errors import InputError
from gemma2.sampling import SamplingParams, SamplingSettings, log_probabilities, next_tokens

if TYPE_CHECKING:
    from gemma2.heads import Gemma2ForCausalLM


# One token's log probability and the most likely tokens' (id, log probability).
TokenLogprob = tuple[float, list[tuple[int, float]]]


@dataclass
class StepEvent:
    """One request's news from a step: a new token, or the end of the request."""

    request_id: Hashable
    token_id: int | None  # None for an abort
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    # With the first event of a request that asked for prompt_logprobs: one per prompt token after the first.
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class _Request:
    request_id: Hashable
    prompt: list[int]
    params: SamplingParams
    settings: SamplingSettings
    stops: frozenset[int]
    generator: torch.Generator | None
    row: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)
    # A group (add_group) reads its prompt once, in its leader's row; the followers copy that row.
    leader: _Request | None = None
    followers: list[_Request] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def decoding(self) -> bool:
        return self.row is not None and self.prefilled == len(self.prompt)

    @property
    def holding_stops(self) -> bool:
        """Whether the stop tokens are still barred (fewer than min_tokens generated)."""
        return len(self.generated) < self.params.min_tokens and bool(self.stops)


def _plain_greedy(request: _Request) -> bool:
    """Greedy with nothing that changes the logits first: the argmax of the raw logits."""
    return not request.settings.do_sample and not request.settings.changes_logits and not request.holding_stops


def stop_token_ids(model: Gemma2ForCausalLM, eos_token_id: int | Sequence[int] | None = None) -> list[int]:
    """Explicit ids, else generation_config.json's eos_token_id, else the config's (one id or a list)."""
    if eos_token_id is None:
        eos_token_id = model.generation_config.get("eos_token_id", model.config.eos_token_id)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]


class Engine:
    """A continuous-batching generator over one causal LM (see the module docstring)."""

    def __init__(
        self,
        model: Gemma2ForCausalLM,
        max_batch: int = 8,
        max_length: int | None = None,
        prefill_chunk: int = 512,
        preallocate: bool = True,
    ) -> None:
        """`max_length` bounds prompt + new tokens per request (default: the context); the cache is
        sized to it at once unless `preallocate` is False (a server: grown as requests need)."""
        context = model.config.max_position_embeddings
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= context
        ):
            raise InputError(
                f"max_length must be an integer in [1, {context}] (the context length), got {max_length!r}"
            )
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        self.model = model
        self.max_batch = max_batch
        self.max_length = max_length or context
        self.prefill_chunk = prefill_chunk
        self.default_stops = stop_token_ids(model)
        # Buffers sized to max_length when the caller gave it; grown on demand otherwise.
        self.cache = Gemma2Cache(model.config, max_length=max_length if preallocate else None, max_batch=max_batch)
        self.waiting: deque[_Request] = deque()
        self.running: dict[int, _Request] = {}  # by cache row
        self.requests: dict[Hashable, _Request] = {}
        self.aborted: list[Hashable] = []
        self._ids = itertools.count()
        self.device = model.device

    # ---- requests ------------------------------------------------------------------------------

    def add(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        params: SamplingParams | None = None,
        request_id: Hashable = None,
    ) -> Hashable:
        """Queue a request; returns its id. Refused (InputError) when prompt + max_new_tokens > max_length."""
        request = self._make_request(prompt_ids, params or SamplingParams(), request_id)
        self.requests[request.request_id] = request
        self.waiting.append(request)
        return request.request_id

    def add_group(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        params: Sequence[SamplingParams],
        request_ids: Sequence[Hashable] | None = None,
    ) -> list[Hashable]:
        """Queue several requests on one prompt (OpenAI's n): they take rows together, the prompt is
        read once and its keys copied to each row, then each samples on its own."""
        if not 1 <= len(params) <= self.max_batch:
            raise InputError(f"a group needs 1 to max_batch ({self.max_batch}) requests, got {len(params)}")
        if request_ids is not None and len(request_ids) != len(params):
            raise InputError(f"{len(params)} sampling params but {len(request_ids)} request ids")
        ids = list(request_ids) if request_ids is not None else [None] * len(params)
        group: list[_Request] = []
        for p, rid in zip(params, ids):
            request = self._make_request(prompt_ids, p, rid)
            if any(request.request_id == other.request_id for other in group):
                raise InputError(f"request id {request.request_id!r} appears twice in the group")
            group.append(request)
        leader = group[0]
        leader.followers = group[1:]
        for request in group:
            if request is not leader:
                request.leader = leader
            self.requests[request.request_id] = request
        self.waiting.append(leader)
        return [r.request_id for r in group]

    def _make_request(
        self, prompt_ids: Sequence[int] | torch.Tensor, params: SamplingParams, request_id: Hashable
    ) -> _Request:
        params.validate()
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1 or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
                raise InputError(f"prompt_ids must be a 1-D tensor of token ids, got shape {list(prompt_ids.shape)}")
            prompt = [int(i) for i in prompt_ids.tolist()]
        else:
            prompt = list(prompt_ids)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
                raise InputError("prompt_ids must be a list of integer token ids")
        vocab = self.model.config.vocab_size
        if not prompt:
            raise InputError("prompt_ids is empty: a request needs at least one token")
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise InputError(f"prompt_ids contains token id {bad[0]}, outside the vocabulary [0, {vocab})")
        bad = [i for i in (params.logit_bias or {}) if not 0 <= i < vocab]
        if bad:
            raise InputError(f"logit_bias names token id {bad[0]}, outside the vocabulary [0, {vocab})")
        if len(prompt) + params.max_new_tokens > self.max_length:
            raise InputError(
                f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) is "
                f"{len(prompt) + params.max_new_tokens} tokens, more than max_length ({self.max_length})"
            )
        if request_id is None:
            request_id = next(self._ids)
            while request_id in self.requests:  # automatic ids skip the ids callers chose
                request_id = next(self._ids)
        if request_id in self.requests:
            raise InputError(f"request id {request_id!r} is already in use")
        stops = set() if params.ignore_eos else set(self.default_stops)
        stops |= set(params.stop_token_ids or ())
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return _Request(request_id, prompt, params, params.settings(), frozenset(stops), generator)

    def abort(self, request_id: Hashable) -> bool:
        """Stop a request now (its row is free before the next step); False if it is unknown or done."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        if request.followers and not request.decoding:
            # The group still needs its prompt read: the next member leads (in the queue or its row).
            heir, *rest = request.followers
            heir.leader, heir.followers = None, rest
            for follower in rest:
                follower.leader = heir
            if request.row is None:
                self.waiting[self.waiting.index(request)] = heir
            else:
                heir.prefilled, heir.prompt_logprobs = request.prefilled, request.prompt_logprobs
                self.cache.copy_row(request.row, heir.row)  # type: ignore[arg-type]
        elif request.leader is not None and not request.decoding:
            request.leader.followers.remove(request)
        elif request.row is None:
            self.waiting.remove(request)
        if request.row is not None:
            self._release(request)
        self.aborted.append(request_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.aborted)

    def row_of(self, request_id: Hashable) -> int | None:
        """The cache row a request holds (None while it waits, or once it is done)."""
        request = self.requests.get(request_id)
        return None if request is None else request.row

    @property
    def rows_in_use(self) -> int:
        return len(self.running)

    def _release(self, request: _Request) -> None:
        assert request.row is not None
        del self.running[request.row]
        self.cache.free_row(request.row)
        request.row = None

    # ---- one step ------------------------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        """Admit waiting requests, read up to prefill_chunk prompt tokens, decode every decoding row."""
        events = [StepEvent(rid, None, finished=True, finish_reason="abort") for rid in self.aborted]
        self.aborted = []
        while self.waiting and len(self.running) + 1 + len(self.waiting[0].followers) <= self.max_batch:
            leader = self.waiting.popleft()
            for request in (leader, *leader.followers):
                request.row = self.cache.allocate_row()
                self.running[request.row] = request
        decoding = [r for r in self.running.values() if r.decoding]
        with torch.no_grad():
            events += self._prefill()
            if decoding:
                events += self._decode(decoding)
        return events

    def _prefill(self) -> list[StepEvent]:
        """Read up to prefill_chunk prompt tokens, oldest request first; chunks of one length share a forward
        (those that want every position's log probabilities a forward of their own kind)."""
        budget = self.prefill_chunk
        chunks: dict[tuple[int, bool], list[_Request]] = {}
        for request in self.running.values():  # admission order
            if request.decoding or request.leader is not None:
                continue
            size = min(len(request.prompt) - request.prefilled, budget)
            if size == 0:
                break
            chunks.setdefault((size, request.params.prompt_logprobs is not None), []).append(request)
            budget -= size
        events = []
        for (size, every_position), requests in chunks.items():
            ids = torch.tensor(
                [r.prompt[r.prefilled : r.prefilled + size] for r in requests], dtype=torch.long, device=self.device
            )
            rows = [r.row for r in requests]
            keep = 0 if every_position else 1
            logits = self.model(ids, past_key_values=self.cache, cache_rows=rows, logits_to_keep=keep).logits
            for i, request in enumerate(requests):
                if every_position:
                    self._score_prompt(request, logits[i], size)
                request.prefilled += size
                if request.decoding:  # the whole prompt is read: its first token, and its group's
                    events += self._start(request, logits[i, -1])
        return events

    def _score_prompt(self, request: _Request, logits: torch.Tensor, size: int) -> None:
        """Record the log probability of each prompt token that this chunk's logits [size, V] predict."""
        top = request.params.prompt_logprobs or 0
        for i in range(size):
            position = request.prefilled + i + 1  # the token logits[i] predicts
            if position < len(request.prompt):
                request.prompt_logprobs.append(log_probabilities(logits[i], request.prompt[position], top))

    def _start(self, leader: _Request, logits: torch.Tensor) -> list[StepEvent]:
        """A prompt is read: copy it to the group's rows, then each member picks its first token."""
        group = [leader, *leader.followers]
        for follower in leader.followers:
            assert leader.row is not None and follower.row is not None
            self.cache.copy_row(leader.row, follower.row)
            follower.prefilled, follower.leader = leader.prefilled, None
            follower.prompt_logprobs = leader.prompt_logprobs
        leader.followers = []
        events = []
        for request in group:
            if request.params.max_new_tokens == 0:  # the prompt's log probabilities were all it asked for
                event = StepEvent(request.request_id, None, finished=True, finish_reason="length")
                self._finish(request)
            else:
                event = self._emit(request, logits)
            if request.params.prompt_logprobs is not None:
                event.prompt_logprobs = request.prompt_logprobs
            events.append(event)
        return events

    def _decode(self, requests: list[_Request]) -> list[StepEvent]:
        ids = torch.tensor([[r.generated[-1]] for r in requests], dtype=torch.long, device=self.device)
        rows = [r.row for r in requests]
        if all(_plain_greedy(r) and not r.params.logprobs for r in requests):
            # Only argmaxes are needed: from the logits this process holds (under tensor parallelism,
            # its vocabulary shard, never gathered).
            out = self.model(ids, past_key_values=self.cache, cache_rows=rows, logits_to_keep=1, vocab_shard=True)
            tokens = self.model.greedy_tokens_of_shard(out.logits[:, -1]).tolist()
            return [self._emit(request, out.logits[i, -1], tokens[i]) for i, request in enumerate(requests)]
        logits = self.model(ids, past_key_values=self.cache, cache_rows=rows, logits_to_keep=1).logits[:, -1]
        # Plain greedy rows take one argmax for the whole batch (the same index as one row at a time).
        greedy = self.model.greedy_tokens(logits).tolist() if any(map(_plain_greedy, requests)) else []
        return [
            self._emit(request, logits[i], greedy[i] if _plain_greedy(request) else None)
            for i, request in enumerate(requests)
        ]

    def _emit(self, request: _Request, logits: torch.Tensor, token: int | None = None) -> StepEvent:
        """Pick the request's next token from its logits [V] (unless given); finish it on a stop or its length."""
        if token is None:
            # The ids seen so far matter only to the penalties: no tensor of them otherwise.
            seen = request.prompt + request.generated if request.settings.penalizes else []
            seen_ids = torch.tensor([seen], dtype=torch.long, device=logits.device)
            generated = request.generated if request.settings.counts_output else []
            generated_ids = torch.tensor([generated], dtype=torch.long, device=logits.device)
            choosable = logits[None]
            if request.holding_stops:  # min_tokens: no stop token yet
                choosable = choosable.float().index_fill(1, torch.tensor(sorted(request.stops)), float("-inf"))
            token = int(next_tokens(choosable, seen_ids, request.settings, request.generator, generated_ids)[0])
        request.generated.append(token)
        event = StepEvent(request.request_id, token)
        if request.params.logprobs:
            event.logprob, event.top_logprobs = log_probabilities(logits, token, request.params.logprobs)
        if token in request.stops:
            event.finished, event.finish_reason = True, "stop"
        elif len(request.generated) >= request.params.max_new_tokens:
            event.finished, event.finish_reason = True, "length"
        if event.finished:
            self._finish(request)
        return event

    def _finish(self, request: _Request) -> None:
        self._release(request)
        del self.requests[request.request_id]
